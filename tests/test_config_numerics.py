"""Config values the other parity tests never vary: a RoPE base other than 10,000, an RMSNorm
epsilon other than 1e-6, and a hidden size whose square root (the embedding normaliser) the
compute dtype rounds. Every checkpoint in conftest uses 10,000, 1e-6 and hidden 64 (sqrt 8,
exact in every dtype), so a model that ignored any of the three would still match there.

The checkpoints here are written by transformers at test time with hidden 48: sqrt(48) =
6.9282, which bfloat16 rounds to 6.9375 and float16 to 6.9297; transformers' Gemma multiplies
the embeddings by the normaliser cast to the weights' dtype, as the checkpoints were trained.
That rounding is checked on the scaled embeddings themselves, not on the logits: a normaliser
off by 0.14% (bfloat16) or 0.02% (float16) is within the rounding noise that separates two
implementations' reduced-precision logits (measured on JAX: bfloat16 logits 0.021 from
transformers' on average, 0.030 from transformers' with the unrounded normaliser; float16
0.0036 from both, as our float16 residual stream is float32 and transformers' float16), while
the scaled embeddings are equal to the last bit. Under bfloat16 the residual stream is bfloat16,
so a normaliser kept in float32 is rounded by the product anyway; float16 is where it shows.
"""

import copy
import math

import keras
import numpy as np
import pytest
from conftest import (hf_logits, logits_of, max_diff_on_real_tokens, randomize_torch,
                      token_batch)

import gemma_keras as gk

TOL = 1e-4
HIDDEN = 48
# rope_theta on both sides of 10,000 (one per model type); eps large enough against the
# activations (mean square ~3 at the embedding) to move the logits far past TOL (checked by
# test_the_configs_under_test_change_transformers_logits).
CONFIGS = {
    "gemma": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  rope_theta=1_000.0, rms_norm_eps=0.05),
    "gemma2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=16, sliding_window=5, attn_logit_softcapping=4.0,
                   final_logit_softcapping=6.0, rope_theta=50_000.0, rms_norm_eps=0.05),
}


def _hf_model(model_type, vocab_size, **changes):
    """A random transformers model of CONFIGS[model_type] (with `changes`), float32."""
    import torch
    import transformers

    kwargs = {**CONFIGS[model_type], **changes}
    rope_theta = kwargs.pop("rope_theta")
    common = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64,
                  num_hidden_layers=2, hidden_activation="gelu_pytorch_tanh",
                  rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    if model_type == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**common, **kwargs))
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, **kwargs, attn_implementation="eager"))
    randomize_torch(model)
    return model.eval().to(torch.float32)


@pytest.fixture(scope="module")
def config_checkpoint(tmp_path_factory, vocab_size):
    """model_type -> (directory read-only, transformers model in float32), written once."""
    made = {}

    def get(model_type):
        if model_type not in made:
            model = _hf_model(model_type, vocab_size)
            directory = tmp_path_factory.mktemp(f"config_numerics_{model_type}")
            model.save_pretrained(directory)
            made[model_type] = directory, model
        return made[model_type]
    return get


def _variant_logits(model, model_type, vocab_size, ids, mask, **changes):
    """transformers' logits of `model`'s weights under a config with `changes`."""
    variant = _hf_model(model_type, vocab_size, **changes)
    variant.load_state_dict(model.state_dict())
    return hf_logits(variant, ids, mask)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_rope_base_and_norm_epsilon_match_transformers(model_type, config_checkpoint,
                                                       vocab_size):
    directory, model = config_checkpoint(model_type)
    lm = gk.GemmaCausalLM.from_preset(directory, dtype="float32")
    # The reader takes both values from transformers 5's config.json (rope_parameters).
    assert lm.config.rope_max_wavelength == CONFIGS[model_type]["rope_theta"]
    assert lm.config.layer_norm_epsilon == CONFIGS[model_type]["rms_norm_eps"]
    ids, mask = token_batch(vocab_size)
    assert max_diff_on_real_tokens(logits_of(lm, ids, mask), hf_logits(model, ids, mask),
                                   mask) < TOL


@pytest.mark.once("jax")
def test_transformers_4_config_rope_theta_is_read(config_checkpoint, tmp_path, vocab_size):
    """transformers 4.x writes rope_theta at the top of config.json (5.x: in
    rope_parameters): a reader that looked in one place only would load 10,000."""
    import json
    import shutil

    source, model = config_checkpoint("gemma")
    directory = tmp_path / "hf4"
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]
    config.update(rope_theta=theta, rope_scaling=None, transformers_version="4.44.0")
    (directory / "config.json").write_text(json.dumps(config))
    lm = gk.GemmaCausalLM.from_preset(directory, dtype="float32")
    assert lm.config.rope_max_wavelength == CONFIGS["gemma"]["rope_theta"]
    ids, mask = token_batch(vocab_size)
    assert max_diff_on_real_tokens(logits_of(lm, ids, mask), hf_logits(model, ids, mask),
                                   mask) < TOL


@pytest.mark.once("jax")
@pytest.mark.parametrize("model_type", list(CONFIGS))
@pytest.mark.parametrize("change", [dict(rope_theta=10_000.0), dict(rms_norm_eps=1e-6)])
def test_the_configs_under_test_change_transformers_logits(model_type, change,
                                                           config_checkpoint, vocab_size):
    """Guards the test above: with the default RoPE base or epsilon, transformers' own logits
    of the same weights move far past TOL, so a model that used the default would fail it."""
    _, model = config_checkpoint(model_type)
    ids, mask = token_batch(vocab_size)
    moved = max_diff_on_real_tokens(
        _variant_logits(model, model_type, vocab_size, ids, mask, **change),
        hf_logits(model, ids, mask), mask)
    assert moved > 100 * TOL, (change, moved)


def _torch_dtype(dtype):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_embedding_normaliser_is_rounded_as_transformers_rounds_it(dtype, config_checkpoint,
                                                                  vocab_size):
    """The scaled embeddings (the residual stream's start) of every token equal
    transformers' in bfloat16 and float16. float16 keeps that stream in float32
    (layers/precision.py), so there ours must round to transformers' float16 value: the
    product of two float16 numbers is exact in float32, so that is equality, not closeness.
    A normaliser left at float32's sqrt(48) instead differs from transformers in a large
    share of the entries (checked here against transformers' own table)."""
    import torch

    directory, model = config_checkpoint("gemma")
    theirs = copy.deepcopy(model).to(_torch_dtype(dtype)).model.embed_tokens
    ids = np.arange(vocab_size, dtype="int32")[None]  # every row of the table
    with torch.no_grad():
        reference = theirs(torch.tensor(ids, dtype=torch.long)).float().numpy()
        unrounded = (theirs.weight[ids[0]].double() * math.sqrt(HIDDEN)).to(
            _torch_dtype(dtype)).float().numpy()[None]
    assert np.mean(unrounded != reference) > 0.1  # the test can tell the two apart

    lm = gk.GemmaCausalLM.from_preset(directory, dtype=dtype)
    ours = keras.ops.convert_to_numpy(keras.ops.cast(lm.backbone.embed(ids), "float32"))
    rounded = keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(ours, dtype), "float32"))
    np.testing.assert_array_equal(rounded, reference)
    if dtype == "float16":
        # Not rounded further: the float32 stream holds float16 rows times float16(sqrt(48))
        # exactly (11 + 11 significant bits fit float32's 24).
        with torch.no_grad():
            exact = (theirs.weight[ids[0]].float()
                     * float(np.float16(math.sqrt(HIDDEN)))).numpy()[None]
        np.testing.assert_array_equal(ours, exact)


@pytest.mark.once("jax")
def test_keras_hub_preset_norm_epsilon_reaches_every_norm(tmp_path, vocab_size):
    """keras-hub's GemmaBackbone takes layer_norm_epsilon (its RoPE base is fixed at 10,000),
    "the epsilon value used for every layer norm" in its docstring; keras-hub 0.32 hands it
    to the final norm only, its decoder blocks keep 1e-6. So the reference is keras-hub with
    every norm given the preset's epsilon, as documented (and as transformers does, above).
    The reader is the same on every backend; the forward is covered per backend above."""
    import keras_hub

    epsilon = CONFIGS["gemma"]["rms_norm_eps"]
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocab_size, num_layers=2, num_query_heads=4, num_key_value_heads=1,
        hidden_dim=HIDDEN, intermediate_dim=128, head_dim=16, layer_norm_epsilon=epsilon)
    rng = np.random.RandomState(0)
    for variable in backbone.weights:
        std = 0.5 if "norm" in variable.path else 0.25
        variable.assign(rng.normal(0, std, variable.shape).astype("float32"))
    backbone.save_to_preset(str(tmp_path / "kh"))
    ids, mask = token_batch(vocab_size)
    norms = [layer for layer in backbone._flatten_layers() if hasattr(layer, "epsilon")]
    assert len(norms) == 2 * 2 + 1  # two per block, one final

    def keras_hub_logits(norm_epsilon):
        for layer in norms:
            layer.epsilon = norm_epsilon
        hidden = backbone({"token_ids": ids, "padding_mask": mask})
        return keras.ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))

    reference = keras_hub_logits(epsilon)
    lm = gk.GemmaCausalLM.from_preset(tmp_path / "kh")
    assert lm.config.layer_norm_epsilon == epsilon
    assert max_diff_on_real_tokens(logits_of(lm, ids, mask), reference, mask) < TOL
    # Guard: with the default epsilon keras-hub's logits are far from these.
    assert max_diff_on_real_tokens(keras_hub_logits(1e-6), reference, mask) > 100 * TOL
