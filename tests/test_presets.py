"""The bundled preset cards against independent references: the published Gemma facts (the
Gemma and Gemma 2 reports and model cards) and keras-hub's own preset list (names, Kaggle
handles, parameter counts), read from the installed keras_hub at test time."""

import importlib.util
import pathlib
import re

import pytest

from gemma_keras.config import GemmaConfig
from gemma_keras.errors import UnknownPresetError
from gemma_keras.presets import PresetCard, card_for_handle, get_preset_card, list_presets

# The official Keras preset handles; every one must have a card.
OFFICIAL_PRESETS = [
    "gemma_2b_en", "gemma_instruct_2b_en", "gemma_1.1_instruct_2b_en",
    "gemma_7b_en", "gemma_instruct_7b_en", "gemma_1.1_instruct_7b_en",
    "code_gemma_2b_en", "code_gemma_1.1_2b_en", "code_gemma_7b_en",
    "code_gemma_instruct_7b_en", "code_gemma_1.1_instruct_7b_en",
    "gemma2_2b_en", "gemma2_instruct_2b_en", "gemma2_9b_en",
    "gemma2_instruct_9b_en", "gemma2_27b_en", "gemma2_instruct_27b_en",
    # Gemma 2 relatives.
    "shieldgemma_2b_en", "shieldgemma_9b_en", "shieldgemma_27b_en", "vault_gemma_1b_en",
    "c2s_scale_gemma_2_2b_en", "c2s_scale_gemma_2_27b_en",
    # Gemma 3: text-only checkpoints...
    "gemma3_270m", "gemma3_instruct_270m", "gemma3_1b", "gemma3_instruct_1b",
    "gemma3_4b_text", "gemma3_instruct_4b_text", "gemma3_12b_text", "gemma3_instruct_12b_text",
    "gemma3_27b_text", "gemma3_instruct_27b_text",
    # ...and vision-language ones, of which the card describes the language model.
    "gemma3_4b", "gemma3_instruct_4b", "gemma3_12b", "gemma3_instruct_12b",
    "gemma3_27b", "gemma3_instruct_27b",
    # Gemma 3 relatives.
    "medgemma_4b", "medgemma_instruct_4b", "medgemma_instruct_27b", "medgemma_instruct_27b_text",
    "medgemma_1.5_instruct_4b", "function_gemma_instruct_270m",
    "translategemma_4b_it", "translategemma_12b_it", "translategemma_27b_it",
]

# keras-hub presets that carry a SigLIP image encoder beside the language model.
VISION_LANGUAGE = {
    "gemma3_4b", "gemma3_instruct_4b", "gemma3_12b", "gemma3_instruct_12b", "gemma3_27b",
    "gemma3_instruct_27b", "medgemma_4b", "medgemma_instruct_4b", "medgemma_instruct_27b",
    "medgemma_1.5_instruct_4b", "translategemma_4b_it", "translategemma_12b_it",
    "translategemma_27b_it",
}
# keras-hub's Gemma presets that are not causal LMs: bidirectional encoders with pooling.
NOT_CAUSAL_LMS = {"embedding_gemma3_300m", "harrier_embedding_oss_270m"}

# Independent reference: the published total parameter count of each Gemma 1 / Gemma 2
# architecture, keyed by (family, num_layers, hidden_dim).
PUBLISHED_COUNTS = {
    ("gemma", 18, 2048): 2_506_172_416,  # Gemma 2B
    ("gemma", 28, 3072): 8_537_680_896,  # Gemma 7B
    ("gemma2", 26, 2304): 2_614_341_888,  # Gemma 2 2B
    ("gemma2", 42, 3584): 9_241_705_984,  # Gemma 2 9B
    ("gemma2", 46, 4608): 27_227_128_320,  # Gemma 2 27B
}

# (family, num_layers, hidden_dim) -> (query heads, kv heads, head dim, FFN both branches).
# Gemma 3 1B and VaultGemma 1B share 26 layers of 1152: the family tells them apart.
PUBLISHED_SHAPES = {
    ("gemma", 18, 2048): (8, 1, 256, 32768),
    ("gemma", 28, 3072): (16, 16, 256, 49152),
    ("gemma2", 26, 2304): (8, 4, 256, 18432),
    ("gemma2", 42, 3584): (16, 8, 256, 28672),
    ("gemma2", 46, 4608): (32, 16, 128, 73728),
    ("gemma2", 26, 1152): (4, 4, 256, 13824),  # VaultGemma 1B (multi-head attention)
    ("gemma3", 18, 640): (4, 1, 256, 4096),  # 270M
    ("gemma3", 26, 1152): (4, 1, 256, 13824),  # 1B
    ("gemma3", 34, 2560): (8, 4, 256, 20480),  # 4B
    ("gemma3", 48, 3840): (16, 8, 256, 30720),  # 12B
    ("gemma3", 62, 5376): (32, 16, 128, 43008),  # 27B
}

# Gemma 3's published SigLIP-So400m image encoder: width, depth, MLP width, patch, image size.
SIGLIP_SO400M_896 = dict(width=1152, depth=27, mlp=4304, patch=14, image=896)

KAGGLE_HANDLE = re.compile(
    r"kaggle://(?P<owner>keras|google)/(?P<model>[\w-]+)/keras/(?P<variation>[\w.]+)"
    r"/(?P<version>[1-9]\d*)")
# The Kaggle models each family's presets are published under.
KAGGLE_MODELS = {
    "gemma": {"gemma"}, "codegemma": {"codegemma"},
    "gemma2": {"gemma2", "shieldgemma", "vaultgemma", "cell2sentence"},
    "gemma3": {"gemma3", "medgemma", "function-gemma", "translategemma"},
}
NAME_PREFIXES = {
    "gemma": ("gemma_",), "codegemma": ("code_gemma_",),
    "gemma2": ("gemma2_", "shieldgemma_", "vault_gemma_", "c2s_scale_gemma_2_"),
    "gemma3": ("gemma3_", "medgemma_", "function_gemma_", "translategemma_"),
}

CARDS = [get_preset_card(name) for name in list_presets()]


def _architecture(card: PresetCard):
    config = card.gemma_config()
    family = "gemma" if card.family == "codegemma" else card.family
    return family, config.num_layers, config.hidden_dim


def _keras_hub_presets() -> dict:
    """keras-hub's GemmaBackbone and Gemma3Backbone preset tables, from the installed package's
    own files (plain dicts; importing keras_hub itself takes ~20 s of TensorFlow)."""
    spec = importlib.util.find_spec("keras_hub")
    if spec is None:
        pytest.skip("keras_hub is not installed")
    root = pathlib.Path(spec.submodule_search_locations[0]) / "src" / "models"
    presets = {}
    for relative in ("gemma/gemma_presets.py", "gemma3/gemma3_presets.py"):
        module_spec = importlib.util.spec_from_file_location("keras_hub_table", root / relative)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        presets.update(module.backbone_presets)
    return presets


KERAS_HUB = _keras_hub_presets()


def _siglip_parameters(width, depth, mlp, patch, image, text_hidden):
    """Weights of keras-hub's Gemma3VisionEncoder: SigLIP (patch conv, position embedding,
    `depth` pre-LayerNorm blocks with biased projections, final LayerNorm), then the soft-token
    RMSNorm and the projection into the language model's `text_hidden` width."""
    block = (4 * (width * width + width)  # query, key, value, output
             + width * mlp + mlp + mlp * width + width  # MLP
             + 2 * 2 * width)  # two LayerNorms, scale and bias
    embeddings = patch * patch * 3 * width + width + (image // patch) ** 2 * width
    return depth * block + embeddings + 2 * width + width + width * text_hidden


def test_every_official_preset_has_a_card_and_no_others():
    assert list_presets() == sorted(OFFICIAL_PRESETS)


def test_every_causal_gemma_preset_keras_hub_lists_has_a_card():
    assert set(KERAS_HUB) - NOT_CAUSAL_LMS == set(list_presets())


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_card_config_constructs_with_the_published_shape(card: PresetCard):
    config = card.gemma_config()
    assert isinstance(config, GemmaConfig)
    if card.family == "gemma3":
        # keras-hub's vision-language MedGemma presets were converted from Hugging Face, whose
        # table has 64 more rows (image tokens); the others from the 262,144-row originals.
        medgemma_with_images = card.name.startswith("medgemma") and card.name in VISION_LANGUAGE
        assert config.vocabulary_size == (262_208 if medgemma_with_images else 262_144)
    else:
        assert config.vocabulary_size == 256_000
    assert _architecture(card) in PUBLISHED_SHAPES
    assert (config.num_query_heads, config.num_key_value_heads, config.head_dim,
            config.intermediate_dim) == PUBLISHED_SHAPES[_architecture(card)]


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_parameter_count_matches_card_and_published_number(card: PresetCard):
    # parameter_count() is arithmetic on the config: no weights are allocated.
    count = card.gemma_config().parameter_count()
    assert count == card.parameter_count
    if _architecture(card) in PUBLISHED_COUNTS:
        assert count == PUBLISHED_COUNTS[_architecture(card)]


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_card_matches_keras_hubs_preset(card: PresetCard):
    listed = KERAS_HUB[card.name]
    assert card.kaggle_handle == listed["kaggle_handle"]
    count = card.gemma_config().parameter_count()
    if card.name not in VISION_LANGUAGE:
        assert count == listed["metadata"]["params"]
    else:
        # keras-hub counts the image encoder too: what is left is exactly its size.
        assert listed["metadata"]["params"] - count == _siglip_parameters(
            **SIGLIP_SO400M_896, text_hidden=card.gemma_config().hidden_dim)


def test_vision_language_presets_of_one_size_differ_from_ours_by_one_image_encoder():
    # Without any formula: keras-hub's count minus ours is one number per language model size.
    extra = {}
    for name in VISION_LANGUAGE:
        card = get_preset_card(name)
        extra.setdefault(card.gemma_config().hidden_dim, set()).add(
            KERAS_HUB[name]["metadata"]["params"] - card.parameter_count)
    assert sorted(extra) == [2560, 3840, 5376]
    assert all(len(sizes) == 1 for sizes in extra.values()), extra
    # ...and the sizes grow by the projection into the wider language model alone.
    (small,), (medium,), (large,) = (extra[hidden] for hidden in sorted(extra))
    width = SIGLIP_SO400M_896["width"]
    assert (medium - small, large - medium) == (width * (3840 - 2560), width * (5376 - 3840))


@pytest.mark.once("jax")
@pytest.mark.parametrize("shape", [
    dict(image_size=28, patch_size=7, num_heads=2, hidden_dim=8, num_layers=2,
         intermediate_dim=12, output_dim=16, pool_size=2),
    dict(image_size=24, patch_size=4, num_heads=3, hidden_dim=12, num_layers=3,
         intermediate_dim=10, output_dim=6, pool_size=3),
])
def test_image_encoder_count_is_keras_hubs(shape):
    # The formula the vision-language check uses, against keras-hub's own encoder (tiny).
    keras_hub = pytest.importorskip("keras_hub")

    encoder = keras_hub.models.Gemma3VisionEncoder(**shape)
    assert encoder.count_params() == _siglip_parameters(
        shape["hidden_dim"], shape["num_layers"], shape["intermediate_dim"],
        shape["patch_size"], shape["image_size"], shape["output_dim"])


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_family_specific_fields(card: PresetCard):
    config = card.gemma_config()
    assert card.name.startswith(NAME_PREFIXES[card.family])
    gemma2, gemma3 = card.family == "gemma2", card.family == "gemma3"
    # VaultGemma is Gemma 2 with pre-norms only, no soft-caps and global attention throughout.
    vault = card.name.startswith("vault_gemma_")
    assert config.use_post_attention_norm is config.use_post_ffw_norm is (
        (gemma2 and not vault) or gemma3)
    assert config.use_sliding_window_attention is ((gemma2 and not vault) or gemma3)
    capped = gemma2 and not vault
    assert config.attention_logit_soft_cap == (50.0 if capped else None)
    assert config.final_logit_soft_cap == (30.0 if capped else None)
    assert config.use_query_key_norm is gemma3
    assert config.local_rope_scaling_factor == 1.0
    assert config.query_pre_attn_scalar is None
    if gemma3:
        large = config.hidden_dim >= 2560  # 4B, 12B, 27B
        assert config.sliding_window_pattern == 6
        assert config.sliding_window_size == (1024 if large else 512)
        assert config.rope("global") == (1_000_000.0, 8.0 if large else 1.0)
        assert config.rope("local") == (10_000.0, 1.0)
        assert config.max_sequence_length == (131_072 if large else 32_768)
    else:
        assert config.sliding_window_pattern == 2
        assert config.rope("global") == config.rope("local") == (10_000.0, 1.0)
        assert config.max_sequence_length == (1024 if vault else 8192)
        if not vault:  # its window is unused: every layer attends globally
            assert config.sliding_window_size == 4096
    # Only the 27Bs scale queries by (hidden / heads) ** -0.5 instead of head_dim ** -0.5:
    # Gemma 2 by 1/12 (4608 / 32 = 144), Gemma 3 by 168 ** -0.5 (5376 / 32).
    scalar = {4608: 144, 5376: 168}.get(config.hidden_dim, config.head_dim)
    assert config.query_head_dim_normalize is (scalar == config.head_dim)
    assert config.query_scale == pytest.approx(scalar ** -0.5)


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_instruct_flag_follows_the_name(card: PresetCard):
    # ShieldGemma is a classifier read from its Yes/No logits on a raw prompt, not a chat
    # model (its name has no "instruct" and its repo no "-it").
    instruct = "instruct" in card.name or card.name.endswith("_it")
    assert card.instruct is instruct
    assert card.hf_repo.endswith("-it") is card.instruct


def test_cards_sharing_a_hugging_face_repo_are_one_language_model():
    # keras-hub publishes Gemma 3's 4B/12B/27B language models alone ("_text") and with the
    # image encoder; Hugging Face has the one multimodal repo for both.
    by_repo = {}
    for card in CARDS:
        by_repo.setdefault(card.hf_repo.lower(), []).append(card)
    shared = {repo: cards for repo, cards in by_repo.items() if len(cards) > 1}
    assert sorted(shared) == sorted(f"google/gemma-3-{size}-{kind}"
                                    for size in ("4b", "12b", "27b") for kind in ("pt", "it"))
    for repo, (with_images, text) in shared.items():
        assert text.name == with_images.name + "_text", repo
        assert text.instruct is with_images.instruct
        assert text.config == with_images.config
        # A handle of the repo finds the first by name, whatever order the files are listed in.
        assert card_for_handle(f"hf://{repo}") is with_images


@pytest.mark.parametrize("card", CARDS, ids=lambda card: card.name)
def test_kaggle_handle_is_well_formed(card: PresetCard):
    match = KAGGLE_HANDLE.fullmatch(card.kaggle_handle)
    assert match, card.kaggle_handle
    assert match["variation"] == card.name
    assert match["model"] in KAGGLE_MODELS[card.family]


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
    ("gemma3_instruct_1", "gemma3_instruct_1b"),
    ("gemma3_4b_txt", "gemma3_4b_text"),
    ("medgemma_instruct_4", "medgemma_instruct_4b"),
    ("shieldgemma_2b", "shieldgemma_2b_en"),
    ("vaultgemma_1b", "vault_gemma_1b_en"),
])
def test_unknown_name_suggests_close_matches(typo, expected):
    from gemma_keras.presets import suggest_presets

    with pytest.raises(UnknownPresetError) as info:
        get_preset_card(typo)
    message = str(info.value)
    assert expected in message
    assert "gk.list_presets()" in message
    assert suggest_presets(typo)[0] == expected


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
    # instruct preset; both presets of a repo that two share, by name), then the hf:// handle
    # of the repo.
    repo = card.hf_repo
    same_repo = sorted(c.name for c in CARDS if c.hf_repo == repo)
    for spelling in (repo, repo.split("/")[1], repo.split("/")[1].upper()):
        assert suggest_presets(spelling) == same_repo + [f"hf://{repo}"], spelling
    assert card.name in same_repo
    assert card.instruct == repo.endswith("-it")


@pytest.mark.once("jax")
def test_a_card_lookup_suggests_only_cards():
    # get_preset_card reads cards; the demo has none, so it is never offered there.
    with pytest.raises(UnknownPresetError) as info:
        get_preset_card("gema_demo")
    assert "gemma_demo" not in str(info.value).split("preset.", 1)[1], str(info.value)


@pytest.mark.once("jax")
def test_a_new_preset_name_offline_is_a_download_error_not_an_unknown_name(monkeypatch):
    # Every built-in name goes to its card's Kaggle handle; with no network that download's
    # failure is the error, with the way out (a local directory), never "not a preset".
    import kagglehub
    import requests

    import gemma_keras as gk
    from gemma_keras.errors import CheckpointError

    asked = []

    def offline(handle, *args, **kwargs):
        asked.append(handle)
        raise requests.ConnectionError("Failed to resolve www.kaggle.com")

    monkeypatch.setattr(kagglehub, "model_download", offline)
    with pytest.raises(CheckpointError, match="local directory") as info:
        gk.GemmaCausalLM.from_preset("gemma3_instruct_1b")
    assert not isinstance(info.value, UnknownPresetError)
    assert "kaggle://keras/gemma3/keras/gemma3_instruct_1b/" in str(info.value)
    assert asked == [get_preset_card("gemma3_instruct_1b").kaggle_handle[len("kaggle://"):]]

    from gemma_keras.checkpoints.resolve import resolve_preset

    for card in CARDS:
        with pytest.raises(CheckpointError, match="local directory"):
            resolve_preset(card.name)
        assert asked[-1] == card.kaggle_handle[len("kaggle://"):]


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
    # ...and every card: one of them missing from the wheel is an "unknown preset" there.
    cards = {repo_root / "presets" / f"{name}.json" for name in list_presets()}
    assert cards <= shipped, cards - shipped
