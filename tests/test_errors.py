"""Bad input gets an error that names the file or argument and says what to do."""

import json
import shutil

import pytest

import gemma_keras as gk
from gemma_keras.checkpoints import keras_hub_format


def _edit_config(directory, edit):
    """Rewrites directory/config.json through `edit(dict)`."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_missing_directory_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(gk.CheckpointError, match="nowhere.*no such directory"):
        gk.GemmaCausalLM.from_preset(str(missing))


def test_directory_without_config(tmp_path):
    with pytest.raises(gk.CheckpointError, match="no config.json"):
        gk.GemmaCausalLM.from_preset(tmp_path)


def test_missing_hf_weights(hf_checkpoint):
    directory, _ = hf_checkpoint("gemma_mqa")
    for f in directory.glob("*.safetensors"):
        f.unlink()
    (directory / "model.safetensors.index.json").unlink()
    with pytest.raises(gk.CheckpointError, match="No weights in .*safetensors"):
        gk.GemmaCausalLM.from_preset(directory)


def test_missing_hf_shard_is_named(hf_checkpoint):
    directory, _ = hf_checkpoint("gemma_mqa")
    victim = sorted(directory.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(gk.CheckpointError, match=victim.name):
        gk.GemmaCausalLM.from_preset(directory)


def test_missing_keras_hub_weights(keras_hub_preset):
    directory, _ = keras_hub_preset("gemma_mqa")
    (directory / "model.weights.h5").unlink()
    with pytest.raises(gk.CheckpointError, match="model.weights.h5"):
        gk.GemmaCausalLM.from_preset(directory)


def test_truncated_safetensors_names_the_file(hf_checkpoint):
    directory, _ = hf_checkpoint("gemma_mqa")
    victim = sorted(directory.glob("*.safetensors"))[0]
    _truncate(victim)
    with pytest.raises(gk.CheckpointError, match=f"{victim.name} is truncated"):
        gk.GemmaCausalLM.from_preset(directory)


def test_corrupt_safetensors_header(hf_checkpoint):
    directory, _ = hf_checkpoint("gemma_mqa")
    victim = sorted(directory.glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[8:16] = b"\xff" * 8  # garbage inside the JSON header
    victim.write_bytes(bytes(data))
    with pytest.raises(gk.CheckpointError, match=victim.name):
        gk.GemmaCausalLM.from_preset(directory)


def _rewrite_header(path, edit):
    """Rewrites a safetensors file's JSON header through `edit(dict)`, keeping the data."""
    import struct

    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header = edit(header) or header
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


# A header can say anything: each lie is a CheckpointError naming the file, never an
# exception from deep inside the reader nor an allocation the file cannot fill.
@pytest.mark.once("jax")  # NumPy and file reads only: no backend code
@pytest.mark.parametrize("edit, message", [
    (lambda h: [1, 2], "not a JSON object"),
    (lambda h: h.update({_first_tensor(h): 7}), "not an object"),
    (lambda h: h[_first_tensor(h)].update(dtype="I64"), "unsupported dtype"),
    (lambda h: h[_first_tensor(h)].update(dtype=["F32"]), "unsupported dtype"),
    (lambda h: h[_first_tensor(h)].update(data_offsets=[-8, 0]), "corrupt shape"),
    (lambda h: h[_first_tensor(h)].update(data_offsets=[64, 32]), "corrupt shape"),
    (lambda h: h[_first_tensor(h)].update(data_offsets="0-8"), "corrupt shape"),
    (lambda h: h[_first_tensor(h)].update(shape=[1.5, 2]), "corrupt shape"),
    (lambda h: h[_first_tensor(h)].update(shape=[10**12, 10**6]), "does not fill"),
    (lambda h: h[_first_tensor(h)].update(shape=[1]), "does not fill"),
])
def test_lying_safetensors_headers_are_refused(hf_checkpoint, edit, message):
    directory, _ = hf_checkpoint("gemma_mqa")
    victim = sorted(directory.glob("*.safetensors"))[0]
    _rewrite_header(victim, edit)
    with pytest.raises(gk.CheckpointError, match=f"{victim.name}.*{message}"):
        gk.GemmaCausalLM.from_preset(directory)


@pytest.mark.once("jax")
@pytest.mark.parametrize("entry", ["../outside.safetensors", "/tmp/outside.safetensors",
                                   "sub/model.safetensors", "", 3, ["a", "b"]])
def test_an_hf_index_naming_files_outside_its_directory_is_refused(hf_checkpoint, tmp_path,
                                                                     entry):
    directory, _ = hf_checkpoint("gemma_mqa")
    # A valid shard outside the checkpoint: a loader that followed the index would read it.
    shard = sorted(directory.glob("*.safetensors"))[0]
    shutil.copy(shard, directory.parent / "outside.safetensors")
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = entry
    index.write_text(json.dumps(data))
    with pytest.raises(gk.CheckpointError, match="index may only name files in its own"):
        gk.GemmaCausalLM.from_preset(directory)


def _link_out_file(directory):
    """model.safetensors (or the first shard) replaced by a link to a valid copy of itself
    outside the directory: a loader that followed it would load without complaint."""
    shard = sorted(directory.glob("*.safetensors"))[0]
    outside = directory.parent / "outside" / shard.name
    outside.parent.mkdir()
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    return shard


def _link_out_subdirectory(directory):
    (directory / "sub").mkdir()
    link = directory / "sub" / "assets"
    link.symlink_to(directory.parent)  # a folder leading out, one level down
    return link


def _link_out_through_inside_link(directory):
    """An inside link to an inside link that leads out: where it lands is what counts."""
    config = directory / "config.json"
    outside = directory.parent / "outside_config.json"
    shutil.move(config, outside)
    (directory / "hop.json").symlink_to(outside)
    config.symlink_to("hop.json")
    return directory / "hop.json"


@pytest.mark.once("jax")
@pytest.mark.parametrize("make_link", [_link_out_file, _link_out_subdirectory,
                                       _link_out_through_inside_link])
def test_links_leading_outside_the_checkpoint_are_refused(hf_checkpoint, make_link):
    directory, _ = hf_checkpoint("gemma_mqa")
    link = make_link(directory)
    for load in (gk.GemmaCausalLM.from_preset, gk.GemmaTokenizer.from_preset):
        with pytest.raises(gk.CheckpointError, match="outside the checkpoint directory") as e:
            load(directory)
        assert str(link) in str(e.value)


@pytest.mark.once("jax")
def test_the_hugging_face_cache_layout_loads_and_its_links_stay_in_their_repository(
        hf_checkpoint, tmp_path, vocab_size):
    """The HF cache: <repo>/snapshots/<revision>/<file> -> ../../blobs/<hash>. Such links
    load; a snapshot link into another repository's blobs is refused."""
    import numpy as np
    from conftest import logits_of, token_batch

    directory, _ = hf_checkpoint("gemma_mqa")
    repo = tmp_path / "hub" / "models--google--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, file in enumerate(sorted(directory.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    ids, mask = token_batch(vocab_size)
    want = logits_of(gk.GemmaCausalLM.from_preset(directory), ids, mask)
    np.testing.assert_array_equal(logits_of(gk.GemmaCausalLM.from_preset(snapshot), ids, mask),
                                  want)
    other = tmp_path / "hub" / "models--evil--x" / "blobs"
    other.mkdir(parents=True)
    shutil.move(repo / "blobs" / "blob0", other / "blob0")
    first = sorted(directory.iterdir())[0].name
    (snapshot / first).unlink()
    (snapshot / first).symlink_to(other / "blob0")
    with pytest.raises(gk.CheckpointError, match="outside the checkpoint directory"):
        gk.GemmaCausalLM.from_preset(snapshot)


@pytest.mark.once("jax")
@pytest.mark.parametrize("entry", ["../model_00000.weights.h5", "/etc/passwd", ["../x"]])
def test_a_keras_shard_index_naming_files_outside_its_directory_is_refused(
        keras_hub_preset, entry):
    directory, _ = keras_hub_preset("gemma_mqa", max_shard_size=0.0001)
    index = directory / "model.weights.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = entry
    index.write_text(json.dumps(data))
    with pytest.raises(gk.CheckpointError, match="index may only name files in its own"):
        gk.GemmaCausalLM.from_preset(directory)


# Found by tests/test_fuzz_readers.py: each was an exception other than a GemmaError (or a
# GemmaError that did not name the file), or a loop as long as a hostile number.
@pytest.mark.once("jax")
@pytest.mark.parametrize("case, edit", [
    ("gemma_mqa", lambda c: c.update(rope_parameters=-5)),  # AttributeError
    ("gemma2_gqa", lambda c: c.update(num_hidden_layers=None)),  # TypeError in layer_types
    ("gemma2_gqa", lambda c: c.update(num_hidden_layers=2 ** 62)),  # a 2**62-step loop
    ("gemma_mqa", lambda c: c.update(rms_norm_eps="small")),  # ValueError
    ("gemma_mqa", lambda c: c.update(head_dim="")),  # GemmaError without the file's name
])
def test_hf_config_values_of_the_wrong_kind_name_the_file(hf_checkpoint, case, edit):
    directory, _ = hf_checkpoint(case)
    _edit_config(directory, edit)
    with pytest.raises(gk.GemmaError, match="config.json"):
        gk.GemmaCausalLM.from_preset(directory)


@pytest.mark.once("jax")
@pytest.mark.parametrize("edit", [
    lambda c: c.update(config="../../etc/passwd"),  # ValueError from dict()
    lambda c: c["config"].update(hidden_dim=""),  # GemmaError without the file's name
    lambda c: c["config"].update(num_layers=10 ** 9),  # loops over every block
])
def test_keras_hub_config_values_of_the_wrong_kind_name_the_file(keras_hub_preset, edit):
    directory, _ = keras_hub_preset("gemma_mqa")
    _edit_config(directory, edit)
    with pytest.raises(gk.GemmaError, match="config.json"):
        gk.GemmaCausalLM.from_preset(directory)


@pytest.mark.once("jax")
def test_json_that_is_not_utf8_and_a_corrupt_tokenizer_name_their_files(hf_checkpoint):
    directory, _ = hf_checkpoint("gemma_mqa")
    config = directory / "config.json"
    original = config.read_bytes()
    config.write_bytes(original[:20] + b"\xa2\xff" + original[22:])
    with pytest.raises(gk.CheckpointError, match="config.json is not UTF-8"):
        gk.GemmaCausalLM.from_preset(directory)
    config.write_bytes(original)
    _truncate(directory / "tokenizer.model", 0.9)
    with pytest.raises(gk.CheckpointError, match="tokenizer.model"):
        gk.GemmaCausalLM.from_preset(directory)


@pytest.mark.once("jax")
def test_h5_names_that_are_not_text_name_the_file(keras_hub_preset, monkeypatch):
    """scripts/fuzz_readers.py --seed 3 found h5 files whose corrupt name tables h5py hands
    over as bytes (then a TypeError deep in the reader); h5py's walk is replaced here by one
    that does the same."""
    import h5py

    directory, _ = keras_hub_preset("gemma_mqa")
    walk = h5py.Group.visititems
    monkeypatch.setattr(h5py.Group, "visititems",
                        lambda self, fn: walk(self, lambda path, obj: fn(path.encode(), obj)))
    with pytest.raises(gk.CheckpointError, match="model.weights.h5.*not text"):
        gk.GemmaCausalLM.from_preset(directory)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_h5_names_the_file(keras_hub_preset, keep):
    directory, _ = keras_hub_preset("gemma_mqa")
    _truncate(directory / "model.weights.h5", keep)
    with pytest.raises(gk.CheckpointError, match="model.weights.h5"):
        gk.GemmaCausalLM.from_preset(directory)


def test_corrupt_config_json(hf_checkpoint):
    directory, _ = hf_checkpoint("gemma_mqa")
    _truncate(directory / "config.json")
    with pytest.raises(gk.CheckpointError, match="config.json is not valid JSON"):
        gk.GemmaCausalLM.from_preset(directory)


def test_other_family_hf_config(hf_checkpoint):
    directory, _ = hf_checkpoint("gemma_mqa")
    _edit_config(directory, lambda c: c.update(model_type="llama"))
    with pytest.raises(gk.ConfigError, match="model_type 'llama'.*gemma, gemma2, vaultgemma, gemma3_text"):
        gk.GemmaCausalLM.from_preset(directory)


def test_other_family_keras_hub_config(keras_hub_preset):
    directory, _ = keras_hub_preset("gemma_mqa")
    _edit_config(directory, lambda c: c.update(registered_name="keras_hub>LlamaBackbone"))
    with pytest.raises(gk.ConfigError, match="LlamaBackbone"):
        gk.GemmaCausalLM.from_preset(directory)


def test_wrong_weight_shape_names_weight_and_shapes_hf(hf_checkpoint):
    directory, _ = hf_checkpoint("gemma_mqa")
    _edit_config(directory, lambda c: c.update(intermediate_size=80))  # weights are 96 wide
    with pytest.raises(gk.WeightShapeError,
                       match=r"decoder_block_0/ffw_gating' has shape \(96, 64\).*\(80, 64\)"):
        gk.GemmaCausalLM.from_preset(directory)


def test_wrong_head_count_is_a_shape_error_not_a_scramble(hf_checkpoint):
    directory, _ = hf_checkpoint("gemma_mqa")
    _edit_config(directory, lambda c: c.update(num_key_value_heads=2))  # weights have 1 kv head
    with pytest.raises(gk.WeightShapeError,
                       match=r"decoder_block_0/key' has shape \(16, 64\).*\(32, 64\)"):
        gk.GemmaCausalLM.from_preset(directory)


def test_wrong_weight_shape_keras_hub(keras_hub_preset):
    directory, _ = keras_hub_preset("gemma_mqa")
    _edit_config(directory, lambda c: c["config"].update(intermediate_dim=160))
    with pytest.raises(gk.WeightShapeError, match=r"ffw_gating' has shape \(64, 96\).*\(64, 80\)"):
        gk.GemmaCausalLM.from_preset(directory)


def test_too_few_layers_in_checkpoint(keras_hub_preset):
    directory, _ = keras_hub_preset("gemma_mqa")
    _edit_config(directory, lambda c: c["config"].update(num_layers=5))
    with pytest.raises(gk.CheckpointError, match="lacks .*decoder_block_3"):
        gk.GemmaCausalLM.from_preset(directory)


def test_unknown_preset_lists_close_matches():
    with pytest.raises(gk.UnknownPresetError, match="gemma2_2b_en"):
        gk.GemmaCausalLM.from_preset("gemma2_2b")


def test_unsupported_dtype(hf_checkpoint):
    directory, _ = hf_checkpoint("gemma_mqa")
    with pytest.raises(gk.ConfigError, match="dtype='int8'"):
        gk.GemmaCausalLM.from_preset(directory, dtype="int8")


def test_invalid_config_values():
    with pytest.raises(gk.ConfigError, match="num_query_heads .* multiple"):
        gk.GemmaConfig(vocabulary_size=10, num_layers=1, num_query_heads=3,
                       num_key_value_heads=2, hidden_dim=8, intermediate_dim=16, head_dim=4)
    with pytest.raises(gk.ConfigError, match="unknown GemmaBackbone argument.*'rope_scaling'"):
        gk.GemmaConfig.from_dict({"rope_scaling": 2})


def test_corrupt_tokenizer(hf_checkpoint):
    directory, _ = hf_checkpoint("gemma_mqa")
    (directory / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(gk.CheckpointError, match="SentencePiece"):
        gk.GemmaCausalLM.from_preset(directory)


def test_failed_save_leaves_no_half_written_preset(hf_checkpoint, tmp_path, monkeypatch):
    lm = gk.GemmaCausalLM.from_preset(hf_checkpoint("gemma_mqa")[0])
    target = tmp_path / "preset"
    lm.save_to_preset(target)
    before = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash while writing weights")

    monkeypatch.setattr(keras_hub_format, "_write_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        lm.save_to_preset(target, overwrite=True)  # an existing preset is replaced only if asked
    with pytest.raises(KeyboardInterrupt):
        lm.save_to_preset(tmp_path / "fresh")
    # The old preset is intact, the new one was never created, no temporaries are left.
    assert {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_gemma_mqa", "preset"]


def test_saved_files_get_the_usual_permissions(hf_checkpoint, tmp_path):
    """Written through temporaries, but readable like any file the user writes (the
    temporaries' private 0600 / 0700 modes would lock others out of a shared preset)."""
    import os

    lm = gk.GemmaCausalLM.from_preset(hf_checkpoint("gemma_mqa")[0])
    old = os.umask(0o022)
    try:
        lm.save_to_preset(tmp_path / "preset")
        lm.backbone.enable_lora(rank=2)
        lm.save_lora_weights(tmp_path / "a.lora.h5")
    finally:
        os.umask(old)
    assert (tmp_path / "preset").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "preset" / "config.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.lora.h5").stat().st_mode & 0o777 == 0o644


def test_save_over_a_file_is_refused(hf_checkpoint, tmp_path):
    lm = gk.GemmaCausalLM.from_preset(hf_checkpoint("gemma_mqa")[0])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(gk.CheckpointError, match="not a directory"):
        lm.save_to_preset(tmp_path / "afile")


def test_local_path_is_copied_before_edit(hf_checkpoint, tmp_path):
    """A keras-hub preset directory copied elsewhere still loads (no absolute paths inside)."""
    directory, _ = hf_checkpoint("gemma_mqa")
    lm = gk.GemmaCausalLM.from_preset(directory)
    lm.save_to_preset(tmp_path / "a", max_shard_size=1e-4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    assert gk.GemmaCausalLM.from_preset(tmp_path / "b").config == lm.config


# ---- issue 32: the training data forms, LoRA files, quantize's warnings ---------------------
@pytest.fixture(scope="module")
def demo():
    return gk.GemmaCausalLM.from_preset("gemma_demo")


def _same_batches(a, b):
    import numpy as np

    (fa, la, wa, _), (fb, lb, wb, _) = a, b
    for key in ("token_ids", "padding_mask"):
        np.testing.assert_array_equal(fa[key], fb[key])
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(wa, wb)


@pytest.mark.once("jax")  # NumPy preprocessing only
def test_fit_takes_records_as_the_finetune_jsonl_lines_give_them(demo):
    """A list of {"prompt", "response"} (or {"text"}) dicts, what json.loads gives for each
    line of a `gemma-keras finetune` JSONL file, trains exactly as the columns do; a dict of
    columns with the records' singular keys is refused, naming both spellings."""
    from gemma_keras import training

    pairs = [("What is Keras?", "A deep learning API."), ("And JAX?", "Array computing.")]
    records = [{"prompt": p, "response": r, "id": i} for i, (p, r) in enumerate(pairs)]
    columns = {"prompts": [p for p, _ in pairs], "responses": [r for _, r in pairs]}
    _same_batches(training.adapt(demo, records), training.adapt(demo, columns))
    texts = ["Module re", "Module json"]
    _same_batches(training.adapt(demo, [{"text": t} for t in texts]),
                  training.adapt(demo, texts))
    batches = list(training.adapt(demo, iter([records]))[0])
    _same_batches((*batches[0], None), (*demo.preprocessor(columns), None))  # untrimmed
    with pytest.raises(gk.InvalidArgumentError, match=r"'prompts'.*records \[\{'prompt'"):
        demo.fit({"prompt": columns["prompts"], "response": columns["responses"]})


def test_load_lora_weights_of_a_folder_names_the_file_to_pass(demo, tmp_path):
    (tmp_path / "adapter.lora.h5").write_bytes(b"")
    with pytest.raises(gk.CheckpointError, match="is a directory.*adapter.lora.h5") as caught:
        demo.load_lora_weights(tmp_path)
    assert "does not exist" not in str(caught.value)


@pytest.mark.once("jax")  # Keras' quantize loop, the same on every backend
@pytest.mark.parametrize("which", ["lm", "backbone"])
def test_quantize_warns_about_nothing_and_quantizes_every_projection(demo, which):
    """Keras' Model.quantize warned once per layer without a quantize() (RMSNorm, Dropout);
    only the layers that have one are offered now, and they are all still quantized."""
    import warnings

    lm = gk.GemmaCausalLM.from_preset("gemma_demo")
    offered = [layer for layer in lm._flatten_layers()
               if len(list(layer._flatten_layers())) == 1
               and type(layer).quantize is not __import__("keras").layers.Layer.quantize]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (lm if which == "lm" else lm.backbone).quantize("int8")
    said = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    assert said == []
    assert offered and all(layer.quantization_mode == "int8" for layer in offered)
