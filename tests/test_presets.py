"""The bundled preset cards against the published Gemma facts (the Gemma and Gemma 2 reports
and model cards): official names, parameter counts, architectures."""

import re

import pytest

from gemma_keras.config import GemmaConfig
from gemma_keras.errors import UnknownPresetError
from gemma_keras.presets import PresetCard, get_preset_card, list_presets

# The official Keras preset handles; every one must have a card.
OFFICIAL_PRESETS = [
    "gemma_2b_en", "gemma_instruct_2b_en", "gemma_1.1_instruct_2b_en",
    "gemma_7b_en", "gemma_instruct_7b_en", "gemma_1.1_instruct_7b_en",
    "code_gemma_2b_en", "code_gemma_1.1_2b_en", "code_gemma_7b_en",
    "code_gemma_instruct_7b_en", "code_gemma_1.1_instruct_7b_en",
    "gemma2_2b_en", "gemma2_instruct_2b_en", "gemma2_9b_en",
    "gemma2_instruct_9b_en", "gemma2_27b_en", "gemma2_instruct_27b_en",
]

# Independent reference: the published total parameter count of each architecture, keyed by
# (num_layers, hidden_dim), which tells the five architectures apart.
PUBLISHED_COUNTS = {
    (18, 2048): 2_506_172_416,  # Gemma 2B
    (28, 3072): 8_537_680_896,  # Gemma 7B
    (26, 2304): 2_614_341_888,  # Gemma 2 2B
    (42, 3584): 9_241_705_984,  # Gemma 2 9B
    (46, 4608): 27_227_128_320,  # Gemma 2 27B
}

# Architecture (num_layers, hidden_dim) -> (query heads, kv heads, head dim, FFN both branches).
PUBLISHED_SHAPES = {
    (18, 2048): (8, 1, 256, 32768),
    (28, 3072): (16, 16, 256, 49152),
    (26, 2304): (8, 4, 256, 18432),
    (42, 3584): (16, 8, 256, 28672),
    (46, 4608): (32, 16, 128, 73728),
}

KAGGLE_HANDLE = re.compile(
    r"kaggle://keras/(gemma|gemma2|codegemma)/keras/(?P<variation>[\w.]+)/(?P<version>[1-9]\d*)")

CARDS = [get_preset_card(name) for name in list_presets()]


def _architecture(config: GemmaConfig):
    return config.num_layers, config.hidden_dim


def test_every_official_preset_has_a_card_and_no_others():
    assert list_presets() == sorted(OFFICIAL_PRESETS)


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_card_config_constructs_with_the_published_shape(card: PresetCard):
    config = card.gemma_config()
    assert isinstance(config, GemmaConfig)
    assert config.vocabulary_size == 256_000
    assert _architecture(config) in PUBLISHED_SHAPES
    assert (config.num_query_heads, config.num_key_value_heads, config.head_dim,
            config.intermediate_dim) == PUBLISHED_SHAPES[_architecture(config)]


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_parameter_count_matches_card_and_published_number(card: PresetCard):
    # parameter_count() is arithmetic on the config: no weights are allocated.
    count = card.gemma_config().parameter_count()
    assert count == card.parameter_count
    assert count == PUBLISHED_COUNTS[_architecture(card.gemma_config())]


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_family_specific_fields(card: PresetCard):
    config = card.gemma_config()
    gemma2 = card.family == "gemma2"
    assert card.family in ("gemma", "codegemma", "gemma2")
    assert card.name.startswith({"gemma": "gemma_", "codegemma": "code_gemma_",
                                 "gemma2": "gemma2_"}[card.family])
    assert config.use_post_attention_norm is gemma2
    assert config.use_post_ffw_norm is gemma2
    assert config.use_sliding_window_attention is gemma2
    assert config.attention_logit_soft_cap == (50.0 if gemma2 else None)
    assert config.final_logit_soft_cap == (30.0 if gemma2 else None)
    assert config.sliding_window_size == 4096
    # Only the 27B scales queries by (hidden / heads) ** -0.5 instead of head_dim ** -0.5.
    assert config.query_head_dim_normalize is (config.hidden_dim != 4608)
    assert config.query_scale == pytest.approx(1 / 12 if config.hidden_dim == 4608 else 1 / 16)


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_instruct_flag_follows_the_name(card: PresetCard):
    assert card.instruct is ("instruct" in card.name)
    assert card.hf_repo.endswith("-it") is card.instruct


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_kaggle_handle_is_well_formed(card: PresetCard):
    match = KAGGLE_HANDLE.fullmatch(card.kaggle_handle)
    assert match, card.kaggle_handle
    assert match["variation"] == card.name
    assert f"/{card.family}/keras/" in card.kaggle_handle


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_description_is_one_sentence(card: PresetCard):
    assert card.description.endswith(".")
    assert card.description.count(". ") == 0


def test_cards_are_cached_and_read_only():
    card = get_preset_card("gemma_2b_en")
    assert get_preset_card("gemma_2b_en") is card
    with pytest.raises(TypeError):
        card.config["num_layers"] = 1


@pytest.mark.parametrize("typo, expected", [
    ("gemma2_2b", "gemma2_2b_en"),
    ("gemma_2b", "gemma_2b_en"),
    ("gemma2_instruct_9b", "gemma2_instruct_9b_en"),
])
def test_unknown_name_suggests_close_matches(typo, expected):
    with pytest.raises(UnknownPresetError) as info:
        get_preset_card(typo)
    message = str(info.value)
    assert expected in message
    assert "gk.list_presets()" in message


def test_unknown_name_with_nothing_close():
    with pytest.raises(UnknownPresetError, match="gk.list_presets"):
        get_preset_card("llama")


@pytest.mark.once("jax")
@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_every_preset_is_the_first_suggestion_for_its_own_misspellings(card):
    from gemma_keras.presets import suggest_presets

    # Case, "-", "_" and "." are how the same name is spelled differently (keras-hub's names
    # vs Hugging Face's), not typos: the preset itself comes first, whatever its neighbours.
    for spelling in (card.name.upper(), card.name.replace("_", "-"), card.name.replace(".", ""),
                     card.name[:-1]):
        assert suggest_presets(spelling)[0] == card.name, spelling
    # Its Hugging Face repo, with or without the owner: this very model (an -it repo its
    # instruct preset), then the hf:// handle of the repo.
    repo = card.hf_repo
    for spelling in (repo, repo.split("/")[1], repo.split("/")[1].upper()):
        assert suggest_presets(spelling)[:2] == [card.name, f"hf://{repo}"], spelling
    assert card.instruct == repo.endswith("-it")


@pytest.mark.once("jax")
def test_a_card_lookup_suggests_only_cards():
    # get_preset_card reads cards; the demo has none, so it is never offered there.
    with pytest.raises(UnknownPresetError) as info:
        get_preset_card("gema_demo")
    assert "gemma_demo" not in str(info.value).split("preset.", 1)[1], str(info.value)


def test_the_wheel_ships_every_subpackage_and_the_demo_preset(repo_root):
    # An editable install finds any folder; a wheel only what pyproject.toml lists (the
    # generation package was once missing from it).
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((repo_root / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {".".join(p.relative_to(repo_root).parent.parts)
             for p in (repo_root / "gemma_keras").rglob("__init__.py")}
    assert found <= listed, found - listed
    # Package data per package: gemma_keras.preset_cards[.sub.folders] lives in presets/.
    shipped = set()
    for package, patterns in project["tool"]["setuptools"]["package-data"].items():
        assert package in listed, package  # data of an unlisted package is not installed
        parts = package.split(".")
        assert parts[:2] == ["gemma_keras", "preset_cards"], package
        folder = (repo_root / "presets").joinpath(*parts[2:])
        shipped |= {p for pattern in patterns for p in folder.glob(pattern)}
    demo = repo_root / "presets" / "gemma_demo"
    needed = {demo / "config.json", demo / "model.weights.h5",
              demo / "assets" / "tokenizer" / "vocabulary.spm"}
    assert needed <= shipped, needed - shipped
