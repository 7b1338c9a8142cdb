"""Built-in preset cards: one JSON file per official Keras Gemma preset, shipped in the package.

A card says what a preset is (family, size, base or instruct), where its weights live (Kaggle
handle, Hugging Face repo), how many parameters it has and its GemmaConfig (keras-hub's backbone
argument names, plus the Gemma 3 fields keras-hub's GemmaBackbone does not take), so a model can
be described and built without downloading anything.

Gemma 3's vision-language checkpoints (gemma3_4b, medgemma_instruct_4b, ...) are described by
their language model, the part gemma_keras loads: the config and the parameter count leave the
SigLIP image encoder out. Two presets may share a Hugging Face repo: keras-hub publishes the
language model of google/gemma-3-4b-it both alone (gemma3_instruct_4b_text) and with its image
encoder (gemma3_instruct_4b).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
from importlib import resources
from typing import Any, Mapping, Optional

from gemma_keras.config import GemmaConfig
from gemma_keras import errors
from gemma_keras.errors import ConfigError, UnknownPresetError

_CARDS_PACKAGE = "gemma_keras.preset_cards"
# Architecture families; relatives keep their base model's (ShieldGemma, VaultGemma and
# Cell2Sentence-Scale are "gemma2"; MedGemma, FunctionGemma and TranslateGemma "gemma3").
_FAMILIES = ("gemma", "codegemma", "gemma2", "gemma3")
KAGGLE_SCHEME = "kaggle://"
HF_SCHEME = "hf://"
# The bundled demo: a small Gemma 2 trained by scripts/train_demo_preset.py, shipped inside the
# package (checkpoints/resolve.py finds it), so that everything runs offline on a fresh install.
DEMO_PRESET = "gemma_demo"


@dataclasses.dataclass(frozen=True)
class PresetCard:
    name: str
    description: str
    family: str  # one of _FAMILIES
    # Instruct presets end their turns with <end_of_turn>, which must then stop generation.
    instruct: bool
    kaggle_handle: str
    hf_repo: Optional[str]
    parameter_count: int
    # GemmaConfig fields (the language model's); read-only because cards are cached and shared.
    config: Mapping[str, Any]

    def gemma_config(self) -> GemmaConfig:
        return GemmaConfig.from_dict(dict(self.config), source=f"preset card {self.name}")


def _parse_card(text: str, file_name: str) -> PresetCard:
    values = json.loads(text)
    expected = {f.name for f in dataclasses.fields(PresetCard)}
    if set(values) != expected:
        raise ConfigError(
            f"preset card {file_name}: expected keys {sorted(expected)}, got {sorted(values)}.")
    if f"{values['name']}.json" != file_name:
        raise ConfigError(f"preset card {file_name}: its name is {values['name']!r}.")
    if values["family"] not in _FAMILIES:
        raise ConfigError(
            f"preset card {file_name}: family {values['family']!r} is not one of {_FAMILIES}.")
    values["config"] = types.MappingProxyType(values["config"])
    return PresetCard(**values)


@functools.lru_cache(maxsize=None)
def _cards() -> Mapping[str, PresetCard]:
    cards = {}
    # Sorted, so that where two cards share a Hugging Face repo the same one is found first on
    # every file system (directory listings come in no fixed order).
    for entry in sorted(resources.files(_CARDS_PACKAGE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            card = _parse_card(entry.read_text(encoding="utf-8"), entry.name)
            cards[card.name] = card
    return types.MappingProxyType(cards)


def list_presets() -> list[str]:
    """Names of the built-in presets, sorted."""
    return sorted(_cards())


def get_preset_card(name: str) -> PresetCard:
    """The card of built-in preset `name`; an unknown name raises with the closest names."""
    if not isinstance(name, str):
        raise errors.ArgumentTypeError(
            f"get_preset_card(name=...) takes a preset name as a string, got "
            f"{type(name).__name__}; {errors.hint('list_presets')}.")
    cards = _cards()
    if name in cards:
        return cards[name]
    raise UnknownPresetError(f"{name!r} is not a built-in Gemma preset."
                             f"{did_you_mean(name, demo=False)} {errors.hint('list_presets')}.")


def did_you_mean(name: str, demo: bool = True) -> str:
    """The sentence that ends an unknown-name message: `suggest_presets(name, demo)` after
    "Did you mean:", or nothing when no preset is close."""
    close = suggest_presets(name, demo)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def suggest_presets(name: str, demo: bool = True, n: int = 3) -> list[str]:
    """What a mistyped preset `name` most likely meant, best first: the built-in presets (and
    the demo, with `demo`) nearest to it once case, "-", "_", "." and spaces are ignored, so
    "gema_demo" gives gemma_demo and "Gemma2-2B-en" gemma2_2b_en. A Hugging Face repo's name
    ("gemma-2-2b-it", "google/gemma-2-2b-it") gives the preset of that very model, then its
    hf:// handle, which loads the same weights from Hugging Face (every preset of that repo, by
    name, when several share it: "gemma-3-4b-it" gives gemma3_instruct_4b,
    gemma3_instruct_4b_text, then hf://google/gemma-3-4b-it)."""
    wanted = loose(name)
    cards = _cards()
    owner, _, repo = name.rpartition("/")
    # A Hugging Face repo of an official preset (repo names have dashes; a name without one,
    # "gemma2_2b", is a mistyped preset name).
    if "-" in name or "/" in name:
        same = [card for card in cards.values() if card.hf_repo is not None
                and loose(card.hf_repo.partition("/")[2]) == loose(repo)
                and owner.lower() in ("", card.hf_repo.partition("/")[0].lower())]
        if same:
            return [card.name for card in same] + [HF_SCHEME + same[0].hf_repo]
    # Each candidate is known by its own name and its Hugging Face repo's name (without the
    # owner): "gemma-2-2b-i" is nearest gemma-2-2b-it, whose preset is gemma2_instruct_2b_en.
    spellings = [(card.name, card.name) for card in cards.values()]
    spellings += [(card.name, card.hf_repo.rpartition("/")[2]) for card in cards.values()
                  if card.hf_repo is not None]
    if demo:
        spellings.append((DEMO_PRESET, DEMO_PRESET))
    matcher = difflib.SequenceMatcher(b=wanted)
    scores = {}
    for preset, spelling in spellings:
        matcher.set_seq1(loose(spelling))
        score = matcher.ratio()
        if score >= _CUTOFF:
            scores[preset] = max(scores.get(preset, 0.0), score)
    return sorted(scores, key=lambda preset: (-scores[preset], preset))[:n]


# difflib.get_close_matches' default: below it a name shares too little to be a typo.
_CUTOFF = 0.6


def loose(name: str) -> str:
    """`name` as a person may have meant it: case, "-", "_", "." and spaces left out."""
    return "".join(c for c in name.lower() if c not in "-_. ")


def card_for_handle(handle) -> Optional[PresetCard]:
    """The card of the official preset that `handle` names: a built-in preset name, its
    `kaggle://` handle (any version) or its `hf://` Hugging Face repo (any revision; of two
    presets of one repo, the first by name, which has the same instruct flag). None for
    anything else (a local directory, another repository)."""
    if not isinstance(handle, str):
        return None
    cards = _cards()
    if handle in cards:
        return cards[handle]
    if handle.startswith(KAGGLE_SCHEME):
        # owner/model/framework/variation: every version of a variation is the same model.
        wanted = _kaggle_model(handle)
        return next((card for card in cards.values()
                     if _kaggle_model(card.kaggle_handle) == wanted), None)
    if handle.startswith(HF_SCHEME):
        # Hugging Face repo ids are case-insensitive; the revision does not change the model.
        wanted = handle[len(HF_SCHEME):].partition("@")[0].lower()
        return next((card for card in cards.values()
                     if card.hf_repo is not None and card.hf_repo.lower() == wanted), None)
    return None


def _kaggle_model(handle: str) -> str:
    return "/".join(handle[len(KAGGLE_SCHEME):].lower().split("/")[:4])
