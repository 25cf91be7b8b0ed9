"""Importing a GGUF file (llama.cpp's format) as an mlx-lm model directory.

Theory of operation
-------------------
People who use Ollama or llama.cpp hold their models as single ``.gguf``
files. ``import_gguf`` turns one into a directory mlx-lm (and so every Skulk
runner, on one node or across a ring) loads like any other: ``config.json``,
``model.safetensors`` (+ index), ``tokenizer.json``, ``tokenizer_config.json``
with the chat template and the special tokens, ``generation_config.json`` and
Skulk's ``model_card.toml``.

The file is read with the ``gguf`` package (memory-mapped; metadata and raw
tensor blocks). Each tensor becomes:

- *kept quantized* when MLX has the same arithmetic: ``Q4_0``, ``Q4_1`` and
  ``Q8_0`` blocks of 32 are exactly MLX's affine quantization with group size
  32 (``w = scale * q + bias``): ``Q4_1`` is ``d * q + m``, ``Q4_0`` is
  ``d * (q - 8)`` and ``Q8_0`` is ``d * q`` over signed bytes (``q + 128``
  unsigned, bias ``-128 d``). Scales and biases stay float16 and every
  product by a power of two is exact, so no weight changes by a single bit;
  only the nibbles are re-packed into MLX's order.
- *kept as is* when it is a float (``F32``, ``F16``, ``BF16``);
- *dequantized to float16, with a warning*, for every other type the ``gguf``
  package can dequantize (K-quants, I-quants, ``Q5_*``...): MLX has no kernel
  for them. ``dequantize=False`` refuses them instead, naming the type;
- *refused* (``GGUFImportError`` naming the tensor and type) otherwise.

Architectures: the ones listed in ``ARCHITECTURES`` (llama, which also covers
Mistral and Llama 3 files, qwen2 and qwen3). Tensor names map onto mlx-lm's
module paths one to one; a tensor the map does not know is an error, never
silently dropped. llama.cpp's converter permutes the rows of llama's Q and K
projections for its interleaved rotary embedding; the import permutes them
back (a row permutation, so it applies to packed quantized rows, scales and
biases alike), which makes the directory the same as a conversion of the
original checkpoint with the standard ``rope_traditional = false``. Llama 3's
``rope_freqs`` tensor is matched against mlx-lm's ``llama3`` rope scaling; a
file whose frequencies no known recipe reproduces is refused.

The tokenizer is rebuilt from the metadata: ``tokenizer.ggml.model == "gpt2"``
(byte-level BPE) with the vocabulary, the merges and the pre-tokenizer named
by ``tokenizer.ggml.pre`` (each a table entry mirroring llama.cpp's and the
original tokenizer's splitting rules), control tokens as special tokens, BOS
prepended when ``add_bos_token`` says so. An unknown pre-tokenizer or
tokenizer model is refused with its name.

The import writes into a private temporary directory next to the target and
renames it into place, so a reader never sees half a model and two importers
racing for one id both end with the same complete directory.

Invariant kept: for kept tensors the imported weights dequantize to exactly
the values llama.cpp's reference dequantization gives (checked by tests
against ``gguf.quants.dequantize`` and, on the logits, against a float64
forward pass over the dequantized weights).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ARCHITECTURES",
    "KEPT_QUANTIZED",
    "GGUFImportError",
    "ImportReport",
    "import_gguf",
    "ensure_imported",
    "read_metadata",
]

log = logging.getLogger(__name__)

# Progress: (stage, done, total), stages in order "read", "tensors", "tokenizer", "write".
Progress = Callable[[str, int, int], None]

ARCHITECTURES = ("llama", "qwen2", "qwen3")
KEPT_QUANTIZED = ("Q4_0", "Q4_1", "Q8_0")  # GGML types with an exact MLX affine equivalent
_KEPT_FLOAT = ("F32", "F16", "BF16")
_GROUP = 32  # GGML block size of the kept quantized types, and MLX's group size for them
_SHARD_BYTES = 2 * 1024**3  # split the weights into files of at most about this much

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6


class GGUFImportError(ValueError):
    """The file cannot be imported; the message names the file and what is unsupported."""


@dataclass(frozen=True)
class ImportReport:
    """What an import produced (for the CLI, the node's log and tests)."""

    path: Path
    model_id: str
    architecture: str
    n_tensors: int
    kept_quantized: dict[str, int]  # GGML type -> tensors kept quantized
    kept_float: dict[str, int]
    dequantized: dict[str, int]  # GGML type -> tensors dequantized to float16
    weight_bytes: int
    warnings: list[str] = field(default_factory=list)


# --- metadata ----------------------------------------------------------------------------


def _reader(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise GGUFImportError(f"{path}: not a readable GGUF file: {exc}") from None


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every metadata key of the GGUF file at ``path`` (token lists included), as Python values."""
    reader = _reader(Path(path))
    return {key: _field(reader, key) for key in reader.fields if not key.startswith("GGUF.")}


class _Meta:
    """Typed access to the metadata keys of one architecture (``<arch>.<key>``)."""

    def __init__(self, reader: Any, source: Path) -> None:
        self.reader = reader
        self.source = source
        arch = _field(reader, "general.architecture")
        if not isinstance(arch, str):
            raise GGUFImportError(f"{source}: no general.architecture in the metadata")
        self.arch = arch

    def get(self, key: str, default: Any = None) -> Any:
        value = _field(self.reader, key)
        return default if value is None else value

    def arch_int(self, key: str, default: int | None = None) -> int:
        value = self.get(f"{self.arch}.{key}", default)
        if value is None:
            raise GGUFImportError(f"{self.source}: metadata {self.arch}.{key} is missing")
        return int(value)

    def arch_float(self, key: str, default: float | None = None) -> float:
        value = self.get(f"{self.arch}.{key}", default)
        if value is None:
            raise GGUFImportError(f"{self.source}: metadata {self.arch}.{key} is missing")
        return float(value)


# --- tensors -----------------------------------------------------------------------------

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Per architecture: the block tensors it may hold (anything else is refused).
_ALLOWED_BLOCK = {
    "llama": {"attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"},
    "qwen2": {"attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"},
    "qwen3": {"attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "attn_norm", "ffn_norm",
              "ffn_gate", "ffn_up", "ffn_down"},
}  # fmt: skip


def _mlx_name(gguf_name: str, arch: str, source: Path) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (strict)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit() and parts[2] in _ALLOWED_BLOCK[arch]:
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES and parts[1] == "weight":
        return f"{_TOP_NAMES[parts[0]]}.weight"
    raise GGUFImportError(f"{source}: tensor {gguf_name!r} has no place in mlx-lm's {arch} model")


def _unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation on the first axis (rows = output features).

    The converter wrote ``w.reshape(n_heads, 2, d/2, ...).swapaxes(1, 2)``;
    reading that back is the opposite reshape and swap.
    """
    out_features = rows.shape[0]
    assert out_features % (2 * n_heads) == 0, (out_features, n_heads)
    half = out_features // n_heads // 2
    rest = rows.shape[1:]
    return rows.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(out_features, *rest)


def _quantized_to_mlx(raw: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGML blocks (rows, n_bytes) uint8 -> MLX affine (packed uint32, scales f16, biases f16).

    Exact: the values ``scale * q + bias`` MLX computes are the values
    llama.cpp's dequantization computes.
    """
    rows = raw.shape[0]
    if kind == "Q8_0":
        blocks = raw.reshape(rows, -1, 34)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        q = blocks[..., 2:34].copy().view(np.int8)
        packed = (q.astype(np.int16) + 128).astype(np.uint8).reshape(rows, -1)
        scales, biases = d, (d * np.float16(-128)).astype(np.float16)
    else:
        size, offset = (18, 2) if kind == "Q4_0" else (20, 4)
        blocks = raw.reshape(rows, -1, size)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        qs = blocks[..., offset : offset + 16]
        values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j, then j + 16
        packed = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8).reshape(rows, -1)
        if kind == "Q4_0":
            scales, biases = d, (d * np.float16(-8)).astype(np.float16)
        else:
            scales, biases = d, blocks[..., 2:4].copy().view(np.float16)[..., 0]
    assert np.isfinite(biases).all() or not np.isfinite(scales).all(), "a bias overflowed float16"
    return np.ascontiguousarray(packed).view(np.uint32), np.ascontiguousarray(scales), np.ascontiguousarray(biases)


@dataclass
class _Converted:
    arrays: dict[str, Any]  # mlx name -> numpy array (bfloat16 kept as raw uint16, flagged below)
    bf16: set[str]
    quant: dict[str, int]  # mlx module path -> bits
    kept_quantized: Counter[str]
    kept_float: Counter[str]
    dequantized: Counter[str]
    warnings: list[str]
    rope_freqs: np.ndarray | None


def _convert_tensors(reader: Any, meta: _Meta, *, dequantize: bool, progress: Progress | None) -> _Converted:
    import gguf
    from gguf import quants

    arch, source = meta.arch, meta.source
    n_heads = meta.arch_int("attention.head_count")
    n_kv = meta.arch_int("attention.head_count_kv", n_heads)
    out = _Converted({}, set(), {}, Counter(), Counter(), Counter(), [], None)
    tensors = list(reader.tensors)
    every = max(1, len(tensors) // 10)
    for i, t in enumerate(tensors):
        kind = t.tensor_type.name
        if t.name == "rope_freqs.weight":
            out.rope_freqs = np.asarray(t.data, dtype=np.float32).reshape(-1)
            continue
        name = _mlx_name(t.name, arch, source)
        module = name.rsplit(".", 1)[0]
        permute = 0
        if arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            permute = n_heads
        elif arch == "llama" and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            permute = n_kv

        def rows_of(a: np.ndarray, heads: int = permute) -> np.ndarray:
            return _unpermute_rows(a, heads) if heads else a

        if kind in KEPT_QUANTIZED:
            if not name.endswith(".weight") or len(t.data.shape) != 2:
                raise GGUFImportError(f"{source}: {t.name} is {kind} but not a 2-D weight")
            wq, scales, biases = _quantized_to_mlx(np.asarray(t.data), kind)
            out.arrays[name] = rows_of(wq)
            out.arrays[f"{module}.scales"] = rows_of(scales)
            out.arrays[f"{module}.biases"] = rows_of(biases)
            out.quant[module] = 8 if kind == "Q8_0" else 4
            out.kept_quantized[kind] += 1
        elif kind in ("F32", "F16"):
            out.arrays[name] = rows_of(np.array(t.data))
            out.kept_float[kind] += 1
        elif kind == "BF16":
            raw = np.asarray(t.data).view(np.uint16)
            shape = tuple(int(s) for s in reversed(t.shape))
            out.arrays[name] = rows_of(raw.reshape(shape).copy())
            out.bf16.add(name)
            out.kept_float[kind] += 1
        else:
            if not dequantize:
                raise GGUFImportError(
                    f"{source}: tensor {t.name} is {kind}, which MLX cannot run quantized "
                    f"(kept quantized: {', '.join(KEPT_QUANTIZED)}); import with dequantization to float16 allowed "
                    f"or requantize the file to one of those types"
                )
            try:
                values = quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType[kind])
            except (NotImplementedError, KeyError, ValueError) as exc:
                raise GGUFImportError(f"{source}: tensor {t.name} has type {kind}, which cannot be read: {exc}") from None
            out.arrays[name] = rows_of(np.asarray(values, dtype=np.float32).astype(np.float16))
            out.dequantized[kind] += 1
        if progress is not None and ((i + 1) % every == 0 or i + 1 == len(tensors)):
            progress("tensors", i + 1, len(tensors))
    if out.dequantized:
        kinds = ", ".join(f"{n} x {k}" for k, n in sorted(out.dequantized.items()))
        out.warnings.append(
            f"{source.name}: {kinds} tensor(s) have no MLX quantized kernel and were dequantized to float16 "
            f"(larger and slower than a {'/'.join(KEPT_QUANTIZED)} file)"
        )
    return out


# --- configuration -----------------------------------------------------------------------


def _llama3_rope_scaling(freqs: np.ndarray, head_dim: int, theta: float, source: Path) -> dict[str, Any]:
    """Find the ``llama3`` rope scaling whose frequency factors equal ``freqs`` (llama.cpp's ``rope_freqs``)."""
    base = theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi * base
    factor = float(freqs.max())
    for old in (8192, 4096, 16384, 32768):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            low_wl, high_wl = old / low, old / high
            smooth = (old / wavelen - low) / (high - low)
            expect = np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor,
                              1.0 / ((1 - smooth) / factor + smooth)))  # fmt: skip
            if expect.shape == freqs.shape and np.allclose(expect, freqs, rtol=1e-4, atol=1e-5):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": old}  # fmt: skip
    raise GGUFImportError(f"{source}: rope_freqs matches no known llama3 rope scaling; cannot import it exactly")


def _config(meta: _Meta, conv: _Converted, vocab_size: int, eos_ids: list[int], bos_id: int | None) -> dict[str, Any]:
    arch, source = meta.arch, meta.source
    hidden = meta.arch_int("embedding_length")
    heads = meta.arch_int("attention.head_count")
    head_dim = meta.arch_int("attention.key_length", hidden // heads)
    theta = meta.arch_float("rope.freq_base", 10000.0)
    tied = "lm_head.weight" not in conv.arrays
    config: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": meta.arch_int("block_count"),
        "intermediate_size": meta.arch_int("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.arch_int("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": meta.arch_float("attention.layer_norm_rms_epsilon"),
        "vocab_size": vocab_size,
        "max_position_embeddings": meta.arch_int("context_length"),
        "rope_theta": theta,
        "rope_traditional": False,
        "tie_word_embeddings": tied,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
    }
    if arch == "llama":
        config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in conv.arrays
        config["mlp_bias"] = False
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if conv.rope_freqs is not None:
        if arch != "llama":
            raise GGUFImportError(f"{source}: rope_freqs in a {arch} file is not supported")
        config["rope_scaling"] = _llama3_rope_scaling(conv.rope_freqs, head_dim, theta, source)
    elif scaling not in (None, "none"):
        factor = meta.get(f"{arch}.rope.scaling.factor")
        if scaling == "linear" and factor:
            config["rope_scaling"] = {"type": "linear", "factor": float(factor)}
        elif scaling == "yarn" and factor and arch in ("qwen2", "qwen3"):
            config["rope_scaling"] = {
                "type": "yarn", "factor": float(factor),
                "original_max_position_embeddings": int(meta.get(f"{arch}.rope.scaling.original_context_length")),
            }  # fmt: skip
        else:
            raise GGUFImportError(f"{source}: rope scaling {scaling!r} is not supported for {arch}")
    if conv.quant:
        bits = Counter(conv.quant.values()).most_common(1)[0][0]
        quant: dict[str, Any] = {"group_size": _GROUP, "bits": bits}
        for module, b in sorted(conv.quant.items()):
            if b != bits:  # mlx-lm reads per-module settings by module path
                quant[module] = {"group_size": _GROUP, "bits": b}
        config["quantization"] = quant
    return config


# --- tokenizer ---------------------------------------------------------------------------

# Split rules of the byte-level BPE pre-tokenizers, as llama.cpp names them
# (tokenizer.ggml.pre). Each mirrors the original tokenizer.json's rule.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = ("default", "gpt-2", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2", "tekken")
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str, source: Path) -> tuple[Any, Any, bool]:
    """(normalizer, pre-tokenizer, ignore_merges) for llama.cpp's pre-tokenizer name ``pre``."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    def split(pattern: str) -> Any:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip

    if pre in ("default", "gpt-2", "gpt2"):
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre == "smollm":
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), False  # fmt: skip
    if pre in ("llama-bpe", "llama3"):
        return None, split(_LLAMA3_SPLIT), True
    if pre == "qwen2":
        return normalizers.NFC(), split(_QWEN2_SPLIT), False
    if pre == "tekken":
        return None, split(_TEKKEN_SPLIT), False
    raise GGUFImportError(
        f"{source}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(_PRE_TOKENIZERS)})"
    )


@dataclass
class _TokenizerOut:
    tokenizer: Any
    config: dict[str, Any]
    vocab_size: int
    eos_ids: list[int]
    bos_id: int | None


def _build_tokenizer(meta: _Meta, context_length: int) -> _TokenizerOut:
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    source = meta.source
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(
            f"{source}: tokenizer.ggml.model {kind!r} is not supported (byte-level BPE, 'gpt2', is); "
            f"SentencePiece ('llama') vocabularies cannot be rebuilt exactly yet"
        )
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    merges: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
    if not tokens or not merges:
        raise GGUFImportError(f"{source}: the tokenizer's tokens or merges are missing")
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    normalizer, pre, ignore_merges = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")), source)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFImportError(f"{source}: the vocabulary has duplicate tokens")
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFImportError(f"{source}: malformed merge {m!r}")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(t, special=ty == _TOKEN_CONTROL, normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    tok.add_tokens(added)  # keeps their ids: they are already in the vocabulary

    def token(key: str) -> tuple[int | None, str | None]:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is None or not 0 <= int(i) < len(tokens):
            return None, None
        return int(i), tokens[int(i)]

    bos_id, bos = token("bos")
    eos_id, eos = token("eos")
    eot_id, _ = token("eot")
    pad_id, pad = token("padding")
    _, unk = token("unknown")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    eos_ids = [i for i in dict.fromkeys((eos_id, eot_id)) if i is not None]
    if not eos_ids:
        raise GGUFImportError(f"{source}: no tokenizer.ggml.eos_token_id: generation could never end")
    template = meta.get("tokenizer.chat_template")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad if pad is not None else eos,
        "unk_token": unk,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "additional_special_tokens": [t for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL
                                      and t not in (bos, eos, pad, unk)],
    }  # fmt: skip
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return _TokenizerOut(tok, config, len(tokens), eos_ids, bos_id)


# --- writing -----------------------------------------------------------------------------


def _save_weights(dest: Path, arrays: Mapping[str, np.ndarray], bf16: set[str]) -> int:
    """Write ``arrays`` as safetensors files of at most ``_SHARD_BYTES`` plus the index; returns total bytes."""
    import mlx.core as mx

    names = sorted(arrays)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        n = int(arrays[name].nbytes)
        if shards[-1] and size + n > _SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    total = sum(int(arrays[n].nbytes) for n in names)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        out = {}
        for name in group:
            a = mx.array(arrays[name])
            out[name] = a.view(mx.bfloat16) if name in bf16 else a
            weight_map[name] = file
        mx.save_safetensors(str(dest / file), out, metadata={"format": "mlx"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return total


def import_gguf(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    model_id: str,
    dequantize: bool = True,
    on_progress: Progress | None = None,
    card_runtime: Mapping[str, Any] | None = None,
) -> ImportReport:
    """Write the GGUF file ``src`` as an mlx-lm model directory at ``dest`` (which must not exist).

    Inputs: the file, the target directory, the id the model is served under
    (written into its card), whether types MLX cannot run quantized may be
    dequantized to float16 (else they are refused), an optional progress
    callback, and card fields to set beyond the derived ones (``card_runtime``,
    for example ``prompt_lookup_depth`` or ``tool_format``). Output: an ``ImportReport``; its ``warnings`` are also logged.
    Raises ``GGUFImportError`` with the reason when the file cannot be
    imported exactly. Not atomic: ``ensure_imported`` is.
    """
    from skulk.core.cards import card_to_toml
    from skulk.cards import CARD_FILENAME, derive_card

    source, target = Path(src), Path(dest)
    if not source.is_file():
        raise GGUFImportError(f"{source}: no such file")
    assert not target.exists(), target
    reader = _reader(source)
    meta = _Meta(reader, source)
    if meta.arch not in ARCHITECTURES:
        raise GGUFImportError(
            f"{source}: architecture {meta.arch!r} is not supported by the GGUF import "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    if on_progress is not None:
        on_progress("read", 1, 1)
    conv = _convert_tensors(reader, meta, dequantize=dequantize, progress=on_progress)
    context = meta.arch_int("context_length")
    tok = _build_tokenizer(meta, context)
    if on_progress is not None:
        on_progress("tokenizer", 1, 1)
    embed = conv.arrays.get("model.embed_tokens.weight")
    if embed is None:
        raise GGUFImportError(f"{source}: no token_embd.weight tensor")
    vocab_size = int(meta.arch_int("vocab_size", embed.shape[0]))
    if embed.shape[0] != vocab_size or tok.vocab_size > vocab_size:
        raise GGUFImportError(
            f"{source}: the embedding has {embed.shape[0]} rows but the vocabulary {tok.vocab_size} tokens"
        )
    config = _config(meta, conv, vocab_size, tok.eos_ids, tok.bos_id)
    config["skulk_imported"] = {"source": source.name, "architecture": meta.arch,
                                "name": str(meta.get("general.name", ""))}  # fmt: skip
    target.mkdir(parents=True)
    total = _save_weights(target, conv.arrays, conv.bf16)
    tok.tokenizer.save(str(target / "tokenizer.json"))
    (target / "tokenizer_config.json").write_text(json.dumps(tok.config, indent=2))
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = {"eos_token_id": tok.eos_ids, "do_sample": False}
    if tok.bos_id is not None:
        generation["bos_token_id"] = tok.bos_id
    (target / "generation_config.json").write_text(json.dumps(generation, indent=2))
    card = derive_card(target, model_id=model_id)
    if card_runtime:
        import msgspec

        card = msgspec.structs.replace(card, **dict(card_runtime))
    (target / CARD_FILENAME).write_text(card_to_toml(card, comment=f"imported by skulk.engine.gguf from {source.name}"))
    if on_progress is not None:
        on_progress("write", 1, 1)
    for warning in conv.warnings:
        log.warning("%s", warning)
    return ImportReport(
        path=target,
        model_id=model_id,
        architecture=meta.arch,
        n_tensors=len(reader.tensors),
        kept_quantized=dict(sorted(conv.kept_quantized.items())),
        kept_float=dict(sorted(conv.kept_float.items())),
        dequantized=dict(sorted(conv.dequantized.items())),
        weight_bytes=total,
        warnings=list(conv.warnings),
    )


def ensure_imported(
    src: str | os.PathLike[str],
    final: str | os.PathLike[str],
    *,
    model_id: str,
    dequantize: bool = True,
    on_progress: Progress | None = None,
    card_runtime: Mapping[str, Any] | None = None,
) -> tuple[Path, ImportReport | None]:
    """Import ``src`` into ``final`` unless a complete import is already there.

    Output: ``(final, report)``; the report is None when nothing was done.
    Safe to call from several processes at once: each imports into a private
    temporary sibling and renames it into place; the first rename wins and the
    others discard their identical copies.
    """
    from skulk.cards import CARD_FILENAME

    final = Path(final)
    if (final / "config.json").is_file() and (final / CARD_FILENAME).is_file():
        return final, None
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.import-", dir=final.parent))
    try:
        report = import_gguf(src, staging / "model", model_id=model_id, dequantize=dequantize, on_progress=on_progress,
                             card_runtime=card_runtime)  # fmt: skip
        try:
            os.rename(staging / "model", final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            return final, None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    assert (final / "config.json").is_file(), final
    return final, ImportReport(**{**report.__dict__, "path": final})
