"""Whether a model is instruction-tuned comes from what describes it, never from its name: the
card of an official preset (by name, Kaggle handle or Hugging Face repo), else what the
checkpoint directory records (save_to_preset writes it), else None."""

import json

import pytest

from gemma_keras.checkpoints.loading import read_instruct
from gemma_keras.errors import CheckpointError
from gemma_keras.presets import get_preset_card, list_presets


def _checkpoint(directory, fmt, instruct="absent"):
    """A checkpoint directory holding only what says its format, and `instruct` where our
    writers record it (keras-hub: metadata.json; HF: config.json) unless "absent"."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"registered_name": "keras_hub>GemmaBackbone"} if fmt == "keras_hub" else {
        "model_type": "gemma"}
    if instruct != "absent":
        record = {"gemma_keras": {"instruct": instruct}}
        if fmt == "keras_hub":
            (directory / "metadata.json").write_text(json.dumps(record))
        else:
            config.update(record)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_built_in_name_reads_its_card():
    assert read_instruct("gemma2_instruct_2b_en", None) is True
    assert read_instruct("code_gemma_1.1_2b_en", None) is False
    for name in list_presets():
        assert read_instruct(name, None) is get_preset_card(name).instruct


@pytest.mark.parametrize("handle, expected", [
    ("kaggle://keras/gemma2/keras/gemma2_instruct_2b_en/2", True),  # the card's own handle
    ("kaggle://keras/gemma/keras/gemma_1.1_instruct_7b_en", True),  # any version
    ("kaggle://keras/gemma/keras/gemma_1.1_instruct_7b_en/1", True),
    ("kaggle://keras/codegemma/keras/code_gemma_7b_en/3", False),
    # No card has this handle, whatever its name says; the directory says nothing either.
    ("kaggle://someone/gemma-instruct/keras/gemma_instruct_2b_en-it/1", None),
])
def test_a_kaggle_handle_reads_the_card_with_that_handle(tmp_path, handle, expected):
    assert read_instruct(handle, _checkpoint(tmp_path, "keras_hub")) is expected


@pytest.mark.parametrize("handle, expected", [
    ("hf://google/gemma-2-9b-it", True),
    ("hf://google/gemma-2-9b-it@main", True),  # any revision
    ("hf://Google/Gemma-1.1-2B-IT", True),  # repo ids are case-insensitive
    ("hf://google/gemma-2b", False),
    ("hf://google/codegemma-1.1-2b", False),
    ("hf://someone/gemma-2b-it", None),  # not one of Google's repos: no card
])
def test_an_hf_handle_of_a_google_repo_reads_its_card(tmp_path, handle, expected):
    assert read_instruct(handle, _checkpoint(tmp_path, "hf")) is expected


@pytest.mark.parametrize("fmt", ["keras_hub", "hf"])
def test_a_directory_says_what_it_records_and_none_when_it_does_not(tmp_path, monkeypatch, fmt):
    for instruct in (True, False, None):
        directory = _checkpoint(tmp_path / f"recorded_{instruct}", fmt, instruct)
        assert read_instruct(str(directory), directory) is instruct
    # keras-hub's and transformers' own checkpoints record nothing.
    bare = _checkpoint(tmp_path / "bare", fmt)
    assert read_instruct(bare, bare) is None
    # A local directory that happens to have an instruct preset's name is that directory.
    monkeypatch.chdir(tmp_path)
    named = _checkpoint(tmp_path / "gemma_instruct_2b_en", fmt)
    assert read_instruct("gemma_instruct_2b_en", named) is None
    # A hub handle without a card falls back to what its downloaded directory records.
    recorded = tmp_path / "recorded_True"
    assert read_instruct("kaggle://someone/gemma/keras/tuned/1", recorded) is True
    assert read_instruct("hf://someone/tuned", recorded) is True

    bad = _checkpoint(tmp_path / "bad", fmt, "yes")
    with pytest.raises(CheckpointError, match="instruct"):
        read_instruct(bad, bad)


@pytest.mark.once("torch")
@pytest.mark.parametrize("fmt", ["keras_hub", "hf"])
def test_save_to_preset_records_instruct_and_from_preset_reads_it_back(tmp_path, fmt):
    import gemma_keras as gk

    config = gk.GemmaConfig(vocabulary_size=64, num_layers=1, num_query_heads=2,
                            num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
                            head_dim=8)
    backbone = gk.GemmaBackbone(config)
    for instruct in (True, False, None):
        directory = tmp_path / str(instruct)
        gk.GemmaCausalLM(backbone, instruct=instruct).save_to_preset(directory, format=fmt)
        assert gk.GemmaCausalLM.from_preset(directory).instruct is instruct
    if fmt == "hf":  # transformers keeps the record as an inert attribute
        transformers = pytest.importorskip("transformers")
        saved = transformers.AutoConfig.from_pretrained(str(tmp_path / "True"))
        assert saved.gemma_keras == {"instruct": True}
        assert saved.model_type == "gemma"
