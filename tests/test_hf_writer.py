"""`save_to_preset(format="hf")` as transformers reads it: an instruct model's checkpoint ends
its replies where `lm.generate` does (transformers' greedy `generate` after
`apply_chat_template`, with no eos given, gives our ids and stops at <end_of_turn>); a base
model's ends at <eos> alone. The reference is transformers itself, loading the bundled demo."""

import json

import numpy as np
import pytest

import gemma_keras as gk

QUESTION = "What does str.join do?"  # the demo answers questions about Python's stdlib


@pytest.fixture(scope="module")
def demo_lm():
    # float32: bfloat16 rounds differently in torch and in our backends, which may flip a
    # greedy choice; the question here is where generation stops, not rounding.
    return gk.GemmaCausalLM.from_preset("gemma_demo", dtype="float32")


def _ids(encoded):
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


@pytest.mark.once("jax")
def test_an_instruct_checkpoint_stops_at_the_end_of_the_turn_in_transformers(demo_lm,
                                                                              tmp_path):
    import torch
    import transformers

    lm, tokenizer = demo_lm, demo_lm.tokenizer
    assert lm.instruct is True
    out = tmp_path / "hf"
    lm.save_to_preset(out, format="hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32).eval()
    max_new = 48
    prompt = _ids(hf_tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                   add_generation_prompt=True, return_dict=True))
    with torch.no_grad():  # no eos_token_id: what the checkpoint says is used
        theirs = model.generate(torch.tensor([prompt]), do_sample=False,
                                max_new_tokens=max_new)[0, len(prompt):].tolist()
    ours = lm.generate({"token_ids": np.array([prompt], "int32"),
                        "padding_mask": np.ones((1, len(prompt)), bool)},
                       max_new_tokens=max_new, include_prompt=False)
    ours = ours["token_ids"][0][ours["padding_mask"][0]].tolist()
    assert theirs == ours
    # The reply ended at its turn's end, well before the token limit.
    assert theirs[-1] == tokenizer.end_of_turn_id and len(theirs) < max_new, theirs
    text = hf_tokenizer.decode(theirs, skip_special_tokens=True)
    assert text == lm.generate(QUESTION, max_new_tokens=max_new, include_prompt=False)
    eos = [tokenizer.eos_token_id, tokenizer.end_of_turn_id]  # as Google's instruct checkpoints
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos


@pytest.mark.once("jax")
def test_a_base_checkpoint_ends_at_eos_alone(demo_lm, tmp_path):
    import transformers

    base = gk.GemmaCausalLM(demo_lm.backbone, demo_lm.tokenizer, instruct=False)
    base.save_to_preset(tmp_path / "hf", format="hf")
    eos = demo_lm.tokenizer.eos_token_id
    config = transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf"))
    assert config.eos_token_id == eos
    assert (config.bos_token_id, config.pad_token_id) == (demo_lm.tokenizer.bos_token_id,
                                                          demo_lm.tokenizer.pad_token_id)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == eos
