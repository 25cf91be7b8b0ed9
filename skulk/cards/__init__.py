"""Model cards on disk: the built-in cards, operator overrides and local model directories.

Theory of operation
-------------------
The core parses and writes card *text* (``skulk.core.cards``); this package is
the part that touches the file system, so it lives outside the core, beside
the built-in cards it ships.

- Built-in cards ship as package data (``skulk/cards/*.toml``, next to this
  module): Skulk's
  generated presets and popular MLX models with their real figures.
- Operator cards (``<data_dir>/cards/*.toml``) override built-ins with the same
  ``model_id`` and add new models. Directories are read in the order given,
  files in name order; a later directory overrides an earlier one, while two
  files of one directory claiming the same ``model_id`` is an error (which of
  them wins would depend on a file name, not on intent).
- ``card_for_model_dir`` describes a local mlx-lm directory: its
  ``model_card.toml`` when it has one (written by Skulk's model generator or by
  an operator), else a card derived from ``config.json`` and the sizes of its
  ``*.safetensors`` files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path

import msgspec

from skulk.core.cards import CardError, ModelCard, card_from_mlx_config, card_from_toml
from skulk.core.ids import ModelId
from skulk.paths import data_dir

__all__ = [
    "CARD_FILENAME",
    "builtin_cards",
    "operator_cards_dir",
    "load_cards",
    "load_default_cards",
    "read_card_dir",
    "card_for_model_dir",
    "derive_card",
]

CARD_FILENAME = "model_card.toml"  # the card inside a model directory

OnError = Callable[[Path, CardError], None]


def _read_cards(files: Iterable[tuple[str, str]], on_error: OnError | None) -> dict[ModelId, ModelCard]:
    """Parse (name, text) pairs; a duplicate model id within one source is an error."""
    out: dict[ModelId, ModelCard] = {}
    origin: dict[ModelId, str] = {}
    for name, text in files:
        try:
            card = card_from_toml(text, source=name)
            if card.model_id in out:
                raise CardError(f"{name}: model_id {card.model_id!r} is also defined by {origin[card.model_id]}")
        except CardError as exc:
            if on_error is None:
                raise
            on_error(Path(name), exc)
            continue
        out[card.model_id] = card
        origin[card.model_id] = name
    return out


def builtin_cards() -> dict[ModelId, ModelCard]:
    """The cards shipped with Skulk (package data ``skulk/cards/*.toml``)."""
    root = resources.files("skulk.cards")
    entries = sorted((e for e in root.iterdir() if e.name.endswith(".toml")), key=lambda e: e.name)
    cards = _read_cards(((f"skulk/cards/{e.name}", e.read_text(encoding="utf-8")) for e in entries), None)
    assert cards, "no built-in cards found: package data missing?"
    return cards


def read_card_dir(directory: Path, *, on_error: OnError | None = None) -> dict[ModelId, ModelCard]:
    """Every ``*.toml`` card in ``directory`` (not recursive); a missing directory has none.

    Without ``on_error`` a bad card raises ``CardError``; with it, the bad card
    is reported and skipped.
    """
    if not directory.is_dir():
        return {}
    files = sorted(p for p in directory.glob("*.toml") if p.is_file())
    return _read_cards(((str(p), p.read_text(encoding="utf-8")) for p in files), on_error)


def operator_cards_dir() -> Path:
    """Where operators put their own cards: ``<data_dir>/cards``."""
    return data_dir() / "cards"


def load_cards(extra_dirs: Iterable[Path] = (), *, on_error: OnError | None = None) -> dict[ModelId, ModelCard]:
    """Built-in cards, then the cards of each directory in ``extra_dirs``, later ones overriding by id.

    The result maps model id to card, sorted by model id (so that iterating it
    never depends on file order).
    """
    cards = builtin_cards()
    for directory in extra_dirs:
        cards.update(read_card_dir(Path(directory), on_error=on_error))
    return {k: cards[k] for k in sorted(cards)}


def load_default_cards(*, on_error: OnError | None = None) -> dict[ModelId, ModelCard]:
    """``load_cards([operator_cards_dir()])``: what a node uses."""
    return load_cards([operator_cards_dir()], on_error=on_error)


def _has_mtp_weights(path: Path, n_layers: int) -> bool:
    """Whether the directory's weight index names MTP weights (mlx-lm conversions drop them)."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return False
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    for name in weight_map:
        if "mtp" in name.split("."):
            return True
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part == "layers" and parts[i + 1].isdigit() and int(parts[i + 1]) >= n_layers:
                return True
    return False


def card_for_model_dir(path: Path, *, model_id: str | None = None) -> ModelCard:
    """A card for the mlx-lm model directory ``path``.

    Uses ``path/model_card.toml`` when present (its ``model_id`` replaced by
    ``model_id`` when one is given). Otherwise derives the card from
    ``config.json`` and the total size of ``*.safetensors``; the id defaults to
    the generator's preset name in the config, else the directory name. MTP
    depth is kept only when the weights actually contain MTP layers. Raises
    ``CardError`` (what is missing, and where).
    """
    path = Path(path)
    card_file = path / CARD_FILENAME
    if card_file.is_file():
        card = card_from_toml(card_file.read_text(encoding="utf-8"), source=str(card_file))
        return card if model_id is None else msgspec.structs.replace(card, model_id=ModelId(model_id))
    return derive_card(path, model_id=model_id)


def derive_card(path: Path, *, model_id: str | None = None) -> ModelCard:
    """Derive a card from ``path/config.json`` and its weight files (ignoring any card file).

    The id defaults to the generator's preset name in the config, else the
    directory name. Raises ``CardError`` (what is missing, and where).
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CardError(f"{path}: not an mlx-lm model directory (no config.json and no {CARD_FILENAME})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CardError(f"{config_file}: invalid JSON: {exc}") from None
    weights = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not weights:
        raise CardError(f"{path}: no *.safetensors weight files")
    weight_bytes = sum(p.stat().st_size for p in weights)
    generated = config.get("skulk_generated") if isinstance(config, dict) else None
    default_id = generated.get("preset") if isinstance(generated, dict) else None
    card = card_from_mlx_config(model_id or default_id or path.name, config, weight_bytes)
    if card.mtp_max_depth and not _has_mtp_weights(path, card.n_layers):
        card = msgspec.structs.replace(card, mtp_max_depth=0)
    return card
