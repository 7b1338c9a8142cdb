"""float16 that does not overflow (layers/precision.py), on a stress checkpoint whose
activations pass float16's 65,504 the way the real Gemma checkpoints' later layers do.

The checkpoint is one of the tiny transformers models of conftest with layer 0's feed-forward
scaled up (a spike of the kind called massive activations: the intermediate gelu(gate) * up
reaches ~9e4, and its output ~3e6 enters the residual stream) and, for Gemma 2, its post-FFN
norm scale raised so the normalised spike adds ~7e4 to the residual. transformers' own float16
forward of it is NaN everywhere (checked below, so the stress is real); ours must give finite
logits close to float32's, float32's greedy tokens, and a float16 LoRA fit whose loss falls as
float32's does. Every backend: the wide-result products differ per backend
(backends/*.linear's out_dtype).
"""

import shutil

import keras
import numpy as np
import pytest
from conftest import hf_model, token_batch

import gemma_keras as gk

FLOAT16_MAX = 65504.0
# float16 keeps 11 significant bits: products of 64-96 terms in float16 operands, the cache
# and the attention probabilities in float16, relative to the logits' range.
LOGIT_TOLERANCE = 0.01
TEXTS = ["The quick brown fox 3 jumps over the lazy dog number 21.",
         "Keras is a deep learning API written in Python.",
         "Gemma models are lightweight open models from Google.",
         "The quick brown fox 12 jumps over the lazy dog number 84."]


def _stress(model):
    """Scales layer 0's feed-forward (and Gemma 2's post-FFN norm) and layer 1's attention
    output so that activations overflow float16; in place."""
    import torch

    layer = model.model.layers[0]
    with torch.no_grad():
        layer.mlp.gate_proj.weight.mul_(45.0)
        layer.mlp.up_proj.weight.mul_(45.0)
        layer.mlp.down_proj.weight.mul_(30.0)
        if hasattr(layer, "post_feedforward_layernorm"):
            # Gemma 3's residual stream peaked at 65,255 with 2e4: just inside float16.
            gemma3 = hasattr(layer.self_attn, "q_norm")
            layer.post_feedforward_layernorm.weight.fill_(3e4 if gemma3 else 2e4)
        # Layer 1's attention output past float16's range too (into its post-norm on Gemma 2).
        model.model.layers[1].self_attn.o_proj.weight.mul_(3e4)
    return model


@pytest.fixture(scope="module")
def stress_checkpoint(tmp_path_factory, spm_path, vocab_size):
    """case -> (directory, transformers model in float32)."""
    made = {}

    def get(case):
        if case not in made:
            model = _stress(hf_model(case, vocab_size, seed=0))
            directory = tmp_path_factory.mktemp(f"stress_{case}")
            model.save_pretrained(directory)
            shutil.copy(spm_path, directory / "tokenizer.model")
            made[case] = directory, model
        return made[case]
    return get


def _torch_forward(model, ids, mask, **kwargs):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long), **kwargs)


def _logits(lm, ids, mask):
    out = lm({"token_ids": ids, "padding_mask": mask})
    return keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2_gqa", "gemma3"])
def test_float16_stays_finite_and_close_to_float32_where_transformers_float16_is_nan(
        stress_checkpoint, vocab_size, case):
    import copy

    import torch

    directory, reference = stress_checkpoint(case)
    ids, mask = token_batch(vocab_size)
    real = mask.astype(bool)
    # The stress is real: the float32 residual stream, layer 0's FFN intermediate and layer
    # 1's attention output pass float16's range...
    peaks = {}
    hooks = [reference.model.layers[0].mlp.down_proj.register_forward_hook(
                 lambda module, args, out: peaks.update(intermediate=args[0].abs().max())),
             reference.model.layers[1].self_attn.o_proj.register_forward_hook(
                 lambda module, args, out: peaks.update(attention=out.abs().max()))]
    hidden = _torch_forward(reference, ids, mask, output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()
    assert max(float(h.abs().max()) for h in hidden) > FLOAT16_MAX
    assert min(float(peak) for peak in peaks.values()) > FLOAT16_MAX, peaks
    # ... and a plain float16 forward (transformers', eager attention) overflows into NaN.
    naive = _torch_forward(copy.deepcopy(reference).to(torch.float16), ids, mask).logits
    assert not torch.isfinite(naive).all()

    want = _torch_forward(reference, ids, mask).logits.numpy()
    lm32 = gk.GemmaCausalLM.from_preset(directory, dtype="float32")
    lm16 = gk.GemmaCausalLM.from_preset(directory, dtype="float16")
    got32, got16 = _logits(lm32, ids, mask), _logits(lm16, ids, mask)
    np.testing.assert_allclose(got32[real], want[real], atol=1e-4, rtol=1e-4)
    assert np.isfinite(got16).all()
    scale = np.abs(want[real]).max()
    error = np.abs(got16 - got32)[real].max()
    assert error <= LOGIT_TOLERANCE * scale, (error, scale)

    # Greedy decoding through the KV cache and the compiled steps: float32's tokens, on a
    # prompt whose float32 path has no near-tie (a random tiny model has some, e.g. two
    # logits 0.0016 apart, below float16's spacing of 0.004 at 8: either token is right).
    # Apart by twice the error measured above plus float16's spacing, no order can flip.
    prompt, want_tokens = _prompt_without_ties(lm32, vocab_size,
                                               margin=2 * error + scale * 2.0 ** -10)
    got_tokens = lm16.generate(prompt, max_new_tokens=GREEDY_TOKENS,
                               stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got_tokens), want_tokens)


GREEDY_TOKENS = 8


def _prompt_without_ties(lm, vocab_size, margin, candidates=32, length=6):
    """The first of `candidates` seeded random prompts whose greedy continuation by `lm` has
    its top two logits at least `margin` apart at every step; (prompt, prompt + tokens)."""
    ids = np.random.RandomState(1).randint(4, vocab_size, (candidates, length)).astype("int32")
    mask = np.ones_like(ids)
    tokens = keras.ops.convert_to_numpy(lm.generate(
        {"token_ids": ids, "padding_mask": mask}, max_new_tokens=GREEDY_TOKENS,
        stop_token_ids=None)["token_ids"])  # [candidates, length + GREEDY_TOKENS]
    logits = _logits(lm, tokens, np.ones_like(tokens))[:, length - 1:-1]
    top = np.sort(logits, axis=-1)[..., -2:]
    gaps = (top[..., 1] - top[..., 0]).min(axis=-1)  # [candidates]
    assert gaps.max() >= margin, "no prompt without near-ties: the stress checkpoint changed"
    row = int(np.argmax(gaps >= margin))
    return {"token_ids": ids[row:row + 1], "padding_mask": mask[row:row + 1]}, tokens[row:row + 1]


def test_float16_lora_fit_loses_as_float32_does(stress_checkpoint):
    directory, _ = stress_checkpoint("gemma2_gqa")
    losses = {}
    for dtype in ("float32", "float16"):
        lm = gk.GemmaCausalLM.from_preset(directory, dtype=dtype)
        lm.preprocessor.sequence_length = 32
        lm.backbone.enable_lora(rank=4)
        keras.utils.set_random_seed(0)
        lm.compile(optimizer=keras.optimizers.Adam(1e-2))
        if dtype == "float16":  # any optimizer: gradients scaled against float16 underflow
            assert isinstance(lm.optimizer, keras.optimizers.LossScaleOptimizer)
        history = lm.fit(TEXTS, epochs=4, batch_size=2, verbose=0, shuffle=False)
        losses[dtype] = np.array(history.history["loss"])
    assert np.isfinite(losses["float16"]).all(), losses
    assert losses["float32"][-1] < losses["float32"][0] - 0.2, losses  # it learns at all
    np.testing.assert_allclose(losses["float16"], losses["float32"], rtol=0.02)
