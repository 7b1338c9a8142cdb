"""Built-in preset cards: one JSON file per official Keras Gemma preset, shipped in the package.

A card says what a preset is (family, size, base or instruct), where its weights live (Kaggle
handle, Hugging Face repo), how many parameters it has and its keras-hub `GemmaBackbone` config,
so a model can be described and built without downloading anything.
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
_FAMILIES = ("gemma", "codegemma", "gemma2")
KAGGLE_SCHEME = "kaggle://"
HF_SCHEME = "hf://"


@dataclasses.dataclass(frozen=True)
class PresetCard:
    name: str
    description: str
    family: str  # "gemma", "codegemma" or "gemma2"
    # Instruct presets end their turns with <end_of_turn>, which must then stop generation.
    instruct: bool
    kaggle_handle: str
    hf_repo: Optional[str]
    parameter_count: int
    # keras-hub GemmaBackbone config; read-only because cards are cached and shared.
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
    for entry in resources.files(_CARDS_PACKAGE).iterdir():
        if entry.name.endswith(".json"):
            card = _parse_card(entry.read_text(encoding="utf-8"), entry.name)
            cards[card.name] = card
    return types.MappingProxyType(cards)


def list_presets() -> list[str]:
    """Names of the built-in presets, sorted."""
    return sorted(_cards())


def get_preset_card(name: str) -> PresetCard:
    """The card of built-in preset `name`; an unknown name raises with the closest names."""
    cards = _cards()
    if name in cards:
        return cards[name]
    close = difflib.get_close_matches(name, list(cards), n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownPresetError(
        f"{name!r} is not a built-in Gemma preset.{hint} {errors.hint('list_presets')}.")


def card_for_handle(handle) -> Optional[PresetCard]:
    """The card of the official preset that `handle` names: a built-in preset name, its
    `kaggle://` handle (any version) or its `hf://` Hugging Face repo (any revision). None for
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
