"""Model and data parallelism through keras.distribution (JAX): on 8 virtual CPU devices, in a
child process (XLA_FLAGS must be set before JAX starts), logits, greedy tokens and one LoRA
fit step under each mesh equal the single-device results, every large weight is split, and
the KV cache is too. Other backends get a clear error."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import gemma_keras as gk

ON_JAX = keras.backend.backend() == "jax"
jax_only = pytest.mark.skipif(not ON_JAX, reason="keras.distribution partitions on JAX only")
TESTS = pathlib.Path(__file__).resolve().parent
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                              "--xla_backend_optimization_level=0",
                 "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
CASES = ("gemma_mqa", "gemma2_gqa", "gemma3")
MESHES = ("model_1x8", "data_8", "mixed_2x4")
MODEL_MESHES = ("model_1x8", "mixed_2x4")
# Weight name -> the axis split over "model" (see gemma_keras/distribution.py).
SPLIT_AXIS = {"token_embedding/embeddings": 0, "query/kernel": 0, "key/kernel": 0,
              "value/kernel": 0, "ffw_gating/kernel": 0, "ffw_gating_2/kernel": 0,
              "attention_output/kernel": 1, "ffw_linear/kernel": 1}


def _run_child(script, timeout):
    env = {**os.environ, **EIGHT_DEVICES}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=TESTS.parent)


@pytest.fixture(scope="module")
def results():
    """Every case x mesh, computed once in one child process (about a minute on 2 cores)."""
    done = _run_child(TESTS / "distributed_child.py", timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["devices"] == 8
    return out


def _split_axis(path):
    for suffix, axis in SPLIT_AXIS.items():
        if path.endswith(suffix):
            return axis
    return None


# ---- equal results ---------------------------------------------------------------------
@jax_only
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("case", CASES)
def test_logits_equal_single_device(results, case, mesh):
    single, run = results[case]["single"], results[case][mesh]
    np.testing.assert_allclose(np.array(run["logits"]), np.array(single["logits"]), atol=1e-5)


@jax_only
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_equal_single_device(results, case, mesh):
    single, run = results[case]["single"], results[case][mesh]
    generated = np.array(single["tokens"])[:, 7:]
    assert len(set(generated.ravel().tolist())) > generated.size // 4  # not one token repeated
    assert run["tokens"] == single["tokens"]


@jax_only
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("case", CASES)
def test_lora_fit_step_equals_single_device(results, case, mesh):
    single, run = results[case]["single"], results[case][mesh]
    assert run["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert set(run["adapters"]) == set(single["adapters"]) and len(single["adapters"]) == 28
    for path, value in single["adapters"].items():
        np.testing.assert_allclose(np.array(run["adapters"][path]), np.array(value),
                                   atol=1e-5, err_msg=path)


# ---- where the weights live --------------------------------------------------------------
@jax_only
@pytest.mark.parametrize("mesh", MODEL_MESHES)
@pytest.mark.parametrize("case", CASES)
def test_every_large_weight_is_split_over_the_model_axis(results, case, mesh):
    weights = results[case][mesh]["weights"]
    large = [p for p in weights if _split_axis(p) is not None]
    assert len(large) == 1 + 7 * 2  # the embedding and 7 kernels per layer, 2 layers
    for path in large:
        axis = _split_axis(path)
        expected = [None, None]
        expected[axis] = "model"
        assert weights[path] == {"spec": expected, "split": True}, path
    for path, layout in weights.items():
        if path.endswith("/scale"):  # norms are replicated
            assert layout == {"spec": [None], "split": False}, path


@jax_only
@pytest.mark.parametrize("mesh", MODEL_MESHES)
@pytest.mark.parametrize("case", CASES)
def test_lora_adapters_and_optimizer_state_follow_their_kernel(results, case, mesh):
    run = results[case][mesh]
    for path, layout in run["adapter_weights"].items():
        column = any(f"/{n}/" in path for n in ("query", "key", "value", "ffw_gating",
                                                 "ffw_gating_2"))
        if path.endswith("lora_kernel_a"):   # [out, rank]
            expected = ["model", None] if column else [None, None]
        else:                                # [rank, in]
            expected = [None, None] if column else [None, "model"]
        assert layout["spec"] == expected, path
    momentum = {p.split("/", 1)[1]: v for p, v in run["optimizer"].items()}
    for path, layout in run["adapter_weights"].items():
        assert momentum[path.replace("/", "_") + "_momentum"] == layout, path


@jax_only
@pytest.mark.parametrize("case", CASES)
def test_data_parallel_replicates_weights_and_splits_the_batch(results, case):
    run = results[case]["data_8"]
    assert all(not layout["split"] for layout in run["weights"].values())
    for kind, layout in run["cache"].items():
        assert layout == {"spec": ["batch", None, None, None], "split": True}, kind


@jax_only
def test_kv_cache_is_split_by_batch_and_kv_heads(results):
    # 4 kv heads split over a model axis of 4 (2x4) but replicated over 8 (1x8, batch 1).
    gqa = results["gemma2_gqa"]
    for kind in ("global", "local"):
        assert gqa["mixed_2x4"]["cache"][kind] == {"spec": ["batch", None, "model", None],
                                                   "split": True}
        assert gqa["model_1x8"]["cache"][kind]["split"] is False
    # One kv head: split on head_dim, as the key/value kernels' rows are.
    mqa = results["gemma_mqa"]
    assert mqa["model_1x8"]["cache"]["global"] == {"spec": [None, None, None, "model"],
                                                   "split": True}
    assert mqa["mixed_2x4"]["cache"]["global"] == {"spec": ["batch", None, None, "model"],
                                                   "split": True}


@jax_only
def test_weight_that_does_not_divide_the_mesh_is_replicated(results):
    odd = results["odd_vocab"]
    weights = odd["model_1x8"]["weights"]
    assert weights["token_embedding/embeddings"] == {"spec": [None, None], "split": False}
    assert weights["decoder_block_0/attention/query/kernel"]["split"]
    np.testing.assert_allclose(np.array(odd["model_1x8"]["logits"]),
                               np.array(odd["single"]["logits"]), atol=1e-5)


# ---- API and errors -----------------------------------------------------------------------
@jax_only
def test_layout_map_names_every_projection():
    from gemma_keras.distribution import layout_map

    mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"],
                                         devices=keras.distribution.list_devices()[:1])
    layouts = layout_map(mesh)
    assert layouts["decoder_block_3/attention/key/kernel"].axes == ("model", None)
    assert layouts["decoder_block_3/ffw/ffw_linear/kernel"].axes == (None, "model")
    assert layouts["decoder_block_3/pre_ffw_norm/scale"] is None
    assert isinstance(gk.model_parallel(mesh), keras.distribution.ModelParallel)


@jax_only
def test_mesh_without_the_named_axes_is_refused():
    mesh = keras.distribution.DeviceMesh((1,), ["data"],
                                         devices=keras.distribution.list_devices()[:1])
    with pytest.raises(gk.ConfigError, match="'batch' and 'model'"):
        gk.model_parallel(mesh)


@pytest.mark.skipif(ON_JAX, reason="the refusal is for the other backends")
@pytest.mark.parametrize("make", [lambda: gk.model_parallel((1, 1)), lambda: gk.data_parallel()])
def test_other_backends_get_a_clear_error(make):
    with pytest.raises(gk.ConfigError, match="needs the JAX backend") as info:
        make()
    assert "KERAS_BACKEND=jax" in str(info.value)


@jax_only
def test_scaling_guide_runs(repo_root):
    done = _run_child(repo_root / "guides" / "scaling.py", timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "same greedy text on 8 devices: True" in done.stdout
