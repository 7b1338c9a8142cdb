"""GemmaTokenizer against keras-hub's tokenizer on the same SentencePiece model."""

import numpy as np
import pytest
import sentencepiece as spm

import gemma_keras as gk

TEXTS = ["The quick brown fox.", "Keras 3 runs on JAX, TensorFlow and PyTorch: 12345!",
         "Gemma models are lightweight open models from Google.",
         "naïve café 東京 🦊 — ok", "", "  leading and trailing  "]


@pytest.fixture
def tokenizer(spm_path):
    return gk.GemmaTokenizer(spm_path)


def test_ids_match_keras_hub(tokenizer, spm_path):
    import keras
    import keras_hub

    reference = keras_hub.models.GemmaTokenizer(proto=str(spm_path))
    for text in TEXTS:
        theirs = keras.ops.convert_to_numpy(reference.tokenize(text)).tolist()
        assert tokenizer.tokenize(text) == theirs, text
    assert tokenizer.vocabulary_size == reference.vocabulary_size()


def test_round_trip_including_byte_fallback(tokenizer):
    for text in TEXTS:
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_special_ids_are_looked_up(tokenizer, spm_path):
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    assert tokenizer.pad_token_id == sp.piece_to_id("<pad>") == 0
    assert tokenizer.bos_token_id == sp.piece_to_id("<bos>")
    assert tokenizer.eos_token_id == sp.piece_to_id("<eos>")
    assert tokenizer.start_of_turn_id == sp.piece_to_id("<start_of_turn>")
    assert tokenizer.end_of_turn_id == sp.piece_to_id("<end_of_turn>")
    assert tokenizer.tokenize("<start_of_turn>user\n")[0] == tokenizer.start_of_turn_id
    assert tokenizer.token_to_id("no-such-piece") is None


def test_bos_and_eos_on_request(tokenizer):
    ids = tokenizer.tokenize("fox", add_bos=True, add_eos=True)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.tokenize(["a", "fox"]) == [tokenizer.tokenize("a"), tokenizer.tokenize("fox")]


def test_detokenize_never_crashes_on_partial_bytes_or_padding_rows(tokenizer):
    fox = tokenizer.tokenize("🦊")
    pieces = [tokenizer.id_to_token(i) for i in fox]
    assert any(p.startswith("<0x") for p in pieces), pieces  # really byte fallback
    assert "\ufffd" in tokenizer.detokenize(fox[:2])  # half a character: replaced, no crash
    # Ids past the SentencePiece table (checkpoints pad the embedding) are dropped.
    assert tokenizer.detokenize([*tokenizer.tokenize("fox"), 10 ** 6]) == "fox"
    # At the boundary, as SentencePiece itself counts its pieces: the first padded row (id =
    # its piece count, which SentencePiece cannot decode) is dropped, the last piece is kept.
    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_proto=tokenizer.proto).GetPieceSize()
    assert tokenizer.detokenize([*tokenizer.tokenize("fox"), size]) == "fox"
    last = spm.SentencePieceProcessor(model_proto=tokenizer.proto).DecodeIds([size - 1])
    assert tokenizer.detokenize([size - 1]) == last
    rows = [tokenizer.tokenize("the fox"), tokenizer.tokenize("a dog")]
    width = max(map(len, rows)) + 2
    batch = np.array([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    assert tokenizer.detokenize(batch, skip_special=True) == ["the fox", "a dog"]
    batch = [[2, *tokenizer.tokenize("x")], [2]]
    assert tokenizer.detokenize(batch, skip_special=True) == ["x", ""]
    assert tokenizer.detokenize(np.int32(tokenizer.eos_token_id)) == ""


def test_from_preset_in_both_layouts(hf_checkpoint, keras_hub_preset, tokenizer):
    for directory in (hf_checkpoint("gemma_mqa")[0], keras_hub_preset("gemma_mqa")[0]):
        loaded = gk.GemmaTokenizer.from_preset(directory)
        assert loaded.tokenize(TEXTS[1]) == tokenizer.tokenize(TEXTS[1])


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(gk.CheckpointError, match="No tokenizer in"):
        gk.GemmaTokenizer.from_preset(tmp_path)
    with pytest.raises(gk.CheckpointError, match="does not exist"):
        gk.GemmaTokenizer(tmp_path / "missing.spm")
