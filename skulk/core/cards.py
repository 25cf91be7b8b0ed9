"""Model cards: the figures placement needs about a model, as TOML.

Theory of operation
-------------------
A card states what the master must know to place a model without opening it:
its weight bytes, its layer count, the shape of its KV cache (hidden size, KV
heads, head dimension), its advertised context length, whether mlx-lm can shard
it tensor-parallel, and runtime knobs for speculative decoding. Cards are small
TOML files; this module only parses and writes text (``tomllib``), the loader
that reads files from disk lives outside the core (``skulk.cards``).

Layout of a card (``[runtime]`` keys are optional)::

    model_id = "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"
    family = "llama"
    weight_bytes = 4517404672
    n_layers = 32
    hidden_size = 4096
    num_kv_heads = 8
    head_dim = 128
    context_length = 131072
    supports_tensor = true
    # optional: KV bytes per token when the cache is not 2 x layers x kv_heads x head_dim x 2
    kv_bytes_per_token = 0

    [runtime]
    mtp_max_depth = 0
    speculative_multi_node = true
    draft_model = ""          # "" means none

    [chat]                    # optional; how the model writes tool calls and reasoning
    tool_format = "hermes"    # hermes, smollm2, llama3_json, mistral, harmony ("" : detect)
    reasoning_format = "think"  # think, harmony, none ("" : detect)
    thinking_toggle = true    # the template honours enable_thinking

Invariants kept: ``card_from_toml(card_to_toml(c)) == c`` for every valid card;
a card that parses has positive figures and never names itself as its draft.
Unknown keys are refused (a typo in an operator card must not silently fall
back to a default).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

import msgspec

from skulk.core.ids import ModelId
from skulk.core.records import Record

__all__ = [
    "CardError",
    "ModelCard",
    "TENSOR_SHARDING_FAMILIES",
    "MLA_LATENT_CACHE_FAMILIES",
    "TOOL_FORMATS",
    "REASONING_FORMATS",
    "card_from_toml",
    "card_to_toml",
    "card_from_mlx_config",
]


class CardError(ValueError):
    """A card (or a model config) is malformed; the message names the source and key."""


class ModelCard(Record, frozen=True, kw_only=True):
    """What placement knows about a model. Bytes are bytes; counts are counts.

    ``kv_bytes_per_token`` is 0 unless the model's KV cache is not described by
    its head figures (multi-head latent attention caches a compressed latent);
    ``skulk.core.memory.kv_bytes_per_token`` is the one place that reads it.
    """

    model_id: ModelId
    family: str
    weight_bytes: int
    n_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    supports_tensor: bool
    mtp_max_depth: int = 0
    speculative_multi_node: bool = True
    draft_model: ModelId | None = None
    kv_bytes_per_token: int = 0
    # Chat formats (``[chat]``): "" means "detect from the chat template" (skulk.engine.chatformat).
    tool_format: str = ""
    reasoning_format: str = ""
    thinking_toggle: bool = False

    def __post_init__(self) -> None:
        if not self.model_id or self.model_id != self.model_id.strip():
            raise CardError(f"model_id must be a non-empty string without surrounding spaces, got {self.model_id!r}")
        for name in ("weight_bytes", "n_layers", "hidden_size", "num_kv_heads", "head_dim", "context_length"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise CardError(f"{self.model_id}: {name} must be a positive integer, got {value!r}")
        for name in ("mtp_max_depth", "kv_bytes_per_token"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise CardError(f"{self.model_id}: {name} must be a non-negative integer, got {value!r}")
        if self.draft_model is not None and (not self.draft_model or self.draft_model == self.model_id):
            raise CardError(f"{self.model_id}: draft_model must name another model, got {self.draft_model!r}")
        if self.tool_format not in TOOL_FORMATS:
            raise CardError(f"{self.model_id}: tool_format must be one of {sorted(TOOL_FORMATS)}, got {self.tool_format!r}")
        if self.reasoning_format not in REASONING_FORMATS:
            raise CardError(
                f"{self.model_id}: reasoning_format must be one of {sorted(REASONING_FORMATS)}, got {self.reasoning_format!r}"
            )


# How a model writes tool calls ("" : detect from its chat template) and its reasoning.
TOOL_FORMATS: frozenset[str] = frozenset({"", "hermes", "smollm2", "llama3_json", "mistral", "harmony"})
REASONING_FORMATS: frozenset[str] = frozenset({"", "think", "harmony", "none"})


# mlx-lm architectures whose Model implements ``shard`` (tensor parallel), as of
# mlx-lm 0.32.2, plus the model_type aliases mlx-lm remaps onto them.
TENSOR_SHARDING_FAMILIES: frozenset[str] = frozenset(
    {
        "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v41", "deepseek_v41_text",
        "exaone_moe", "glm4_moe", "glm4_moe_lite", "gpt_oss", "iquestloopcoder", "iquestcoder",
        "joyai_llm_flash", "kimi_k2", "kimi_k25", "kimi_k3", "llama", "longcat_flash",
        "longcat_flash_ngram", "minimax", "minimax_m2", "minimax_m3_vl", "ministral3", "mistral",
        "mistral4", "muse_spark", "qwen2", "qwen3", "qwen3_5", "qwen3_moe", "step3p5", "xverse",
    }
)  # fmt: skip

# mlx-lm architectures with multi-head latent attention whose cache holds the
# latent (kv_lora_rank) plus the rope key (qk_rope_head_dim) per layer, not
# per-head keys and values.
MLA_LATENT_CACHE_FAMILIES: frozenset[str] = frozenset(
    {"deepseek_v3", "deepseek_v32", "kimi_k2", "joyai_llm_flash"}
)

_TOP_KEYS: dict[str, type] = {
    "model_id": str,
    "family": str,
    "weight_bytes": int,
    "n_layers": int,
    "hidden_size": int,
    "num_kv_heads": int,
    "head_dim": int,
    "context_length": int,
    "supports_tensor": bool,
    "kv_bytes_per_token": int,
}
_REQUIRED_TOP = tuple(k for k in _TOP_KEYS if k != "kv_bytes_per_token")
_RUNTIME_KEYS: dict[str, type] = {
    "mtp_max_depth": int,
    "speculative_multi_node": bool,
    "draft_model": str,
}
_CHAT_KEYS: dict[str, type] = {
    "tool_format": str,
    "reasoning_format": str,
    "thinking_toggle": bool,
}


def _checked(source: str, key: str, value: Any, expected: type) -> Any:
    # bool is a subclass of int: `n_layers = true` must not read as 1.
    if type(value) is not expected:
        raise CardError(f"{source}: {key} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def card_from_toml(text: str, *, source: str = "<card>") -> ModelCard:
    """Parse one card from TOML ``text``; ``source`` names it in errors.

    Output: a validated ``ModelCard``. Raises ``CardError`` on invalid TOML,
    unknown or missing keys, wrong types or non-positive figures.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CardError(f"{source}: invalid TOML: {exc}") from None
    runtime = data.pop("runtime", {})
    if not isinstance(runtime, dict):
        raise CardError(f"{source}: runtime must be a table")
    chat = data.pop("chat", {})
    if not isinstance(chat, dict):
        raise CardError(f"{source}: chat must be a table")
    unknown = sorted(set(data) - set(_TOP_KEYS)) + [f"runtime.{k}" for k in sorted(set(runtime) - set(_RUNTIME_KEYS))]
    unknown += [f"chat.{k}" for k in sorted(set(chat) - set(_CHAT_KEYS))]
    if unknown:
        allowed = f"{sorted(_TOP_KEYS)}, runtime.{sorted(_RUNTIME_KEYS)} and chat.{sorted(_CHAT_KEYS)}"
        raise CardError(f"{source}: unknown keys {unknown}; allowed: {allowed}")
    missing = [k for k in _REQUIRED_TOP if k not in data]
    if missing:
        raise CardError(f"{source}: missing required keys {missing}")
    fields = {k: _checked(source, k, v, _TOP_KEYS[k]) for k, v in data.items()}
    for key, value in runtime.items():
        fields[key] = _checked(source, f"runtime.{key}", value, _RUNTIME_KEYS[key])
    for key, value in chat.items():
        fields[key] = _checked(source, f"chat.{key}", value, _CHAT_KEYS[key])
    if fields.get("draft_model") == "":
        fields["draft_model"] = None
    try:
        return ModelCard(**fields)
    except CardError as exc:
        raise CardError(f"{source}: {exc}") from None


def _toml_string(value: str) -> str:
    # A JSON string literal is a valid TOML basic string (same escapes).
    return msgspec.json.encode(value).decode()


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    assert isinstance(value, str), value
    return _toml_string(value)


def card_to_toml(card: ModelCard, *, comment: str = "") -> str:
    """Write ``card`` in the canonical layout (optionally under a ``#`` comment block).

    ``kv_bytes_per_token`` is written only when set; ``draft_model`` None is
    written as ``""``. Round-trips through ``card_from_toml``.
    """
    lines = [f"# {line}".rstrip() for line in comment.splitlines()] if comment else []
    for key in _TOP_KEYS:
        value = getattr(card, key)
        if key == "kv_bytes_per_token" and value == 0:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    lines += ["", "[runtime]"]
    for key in _RUNTIME_KEYS:
        value = getattr(card, key)
        lines.append(f"{key} = {_toml_value('' if value is None else value)}")
    chat = [(k, getattr(card, k)) for k in _CHAT_KEYS]
    if any(chat_value for _, chat_value in chat):
        lines += ["", "[chat]"] + [f"{k} = {_toml_value(v)}" for k, v in chat]
    text = "\n".join(lines) + "\n"
    assert card_from_toml(text) == card, "card_to_toml must round-trip"
    return text


def _first_int(cfg: Mapping[str, Any], keys: tuple[str, ...], what: str, model_id: str) -> int:
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            if type(value) is not int:
                raise CardError(f"{model_id}: config {key} must be an integer, got {value!r}")
            return value
    raise CardError(f"{model_id}: config.json has no {what} (looked for {list(keys)}); write a card by hand")


def card_from_mlx_config(model_id: str, config: Mapping[str, Any], weight_bytes: int) -> ModelCard:
    """Derive a card from an mlx-lm ``config.json`` (as a dict) and the weights' size.

    Multimodal configs keep their language model in ``text_config``; its
    figures win. The family is the top-level ``model_type``. Tensor support
    follows ``TENSOR_SHARDING_FAMILIES``; MTP depth comes from
    ``num_nextn_predict_layers``. Raises ``CardError`` when a figure is missing.
    """
    if not isinstance(config, Mapping):
        raise CardError(f"{model_id}: config must be an object")
    text = config.get("text_config")
    cfg: dict[str, Any] = dict(config)
    if isinstance(text, Mapping):
        cfg.update(text)
    family = config.get("model_type") or cfg.get("model_type")
    if not isinstance(family, str) or not family:
        raise CardError(f"{model_id}: config.json has no model_type")
    n_layers = _first_int(cfg, ("num_hidden_layers", "n_layers", "num_layers", "n_layer"), "layer count", model_id)
    hidden = _first_int(cfg, ("hidden_size", "d_model", "n_embd", "dim"), "hidden size", model_id)
    heads = _first_int(cfg, ("num_attention_heads", "n_heads", "n_head"), "attention head count", model_id)
    kv_heads = cfg.get("num_key_value_heads") or cfg.get("n_kv_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    context = _first_int(
        cfg,
        ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions", "n_ctx"),
        "context length",
        model_id,
    )
    kv_override = 0
    text_family = cfg.get("model_type", family)
    if "kv_lora_rank" in cfg and (family in MLA_LATENT_CACHE_FAMILIES or text_family in MLA_LATENT_CACHE_FAMILIES):
        latent = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim", 0))
        kv_override = n_layers * latent * 2
        # hidden / heads means nothing under latent attention; the value head is the real width.
        head_dim = cfg.get("v_head_dim") or head_dim
    mtp = cfg.get("num_nextn_predict_layers") or 0
    return ModelCard(
        model_id=ModelId(model_id),
        family=family,
        weight_bytes=weight_bytes,
        n_layers=n_layers,
        hidden_size=hidden,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        context_length=context,
        supports_tensor=family in TENSOR_SHARDING_FAMILIES or text_family in TENSOR_SHARDING_FAMILIES,
        mtp_max_depth=int(mtp),
        kv_bytes_per_token=kv_override,
    )
