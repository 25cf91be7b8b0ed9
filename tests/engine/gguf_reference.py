"""An independent oracle for GGUF imports: exact float64 math on a GGUF file's own tensors.

Nothing here is shared with ``skulk.engine.gguf``: the weights come from the
``gguf`` package's reference dequantization, keep the file's names and row
order, and the rotary embedding follows llama.cpp's own convention for each
architecture (adjacent pairs for llama, whose Q/K rows the converter
permuted; split halves, "NeoX", for qwen2 and qwen3). So an import that
mis-packs a nibble, forgets to undo the permutation, or mislabels a norm
cannot agree with it.

Also a tiny greedy byte-level BPE, straight from the merges list, as an oracle
for the rebuilt tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, theta: float, neox: bool) -> np.ndarray:
    """x: (L, H, D); positions 0..L-1."""
    length, _, dim = x.shape
    inv = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # (D/2,)
    ang = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]  # (L, D/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        a, b = x[..., : dim // 2], x[..., dim // 2 :]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


class GGUFReference:
    """The model in a GGUF file, dequantized to float64, with a plain forward pass."""

    def __init__(self, path: str | Path) -> None:
        import gguf
        from gguf import quants

        r = gguf.GGUFReader(str(path))

        def field(key: str, default: Any = None) -> Any:
            f = r.fields.get(key)
            if f is None:
                return default
            v = f.contents()
            return v.tolist() if isinstance(v, np.ndarray) else v

        self.arch = field("general.architecture")
        a = self.arch
        self.n_layers = int(field(f"{a}.block_count"))
        self.n_heads = int(field(f"{a}.attention.head_count"))
        self.n_kv = int(field(f"{a}.attention.head_count_kv", self.n_heads))
        hidden = int(field(f"{a}.embedding_length"))
        self.head_dim = int(field(f"{a}.attention.key_length", hidden // self.n_heads))
        self.eps = float(field(f"{a}.attention.layer_norm_rms_epsilon"))
        self.theta = float(field(f"{a}.rope.freq_base", 10000.0))
        self.w: dict[str, np.ndarray] = {}
        for t in r.tensors:
            values = quants.dequantize(np.asarray(t.data), t.tensor_type)
            shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
            self.w[t.name] = np.asarray(values, dtype=np.float64).reshape(shape)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(L, V) float64 logits for ``tokens`` from position 0."""
        w, length, hd = self.w, len(tokens), self.head_dim
        neox = self.arch in ("qwen2", "qwen3")
        x = w["token_embd.weight"][np.asarray(tokens)]
        mask = np.triu(np.full((length, length), -np.inf), k=1)
        group = self.n_heads // self.n_kv
        for i in range(self.n_layers):
            p = f"blk.{i}."

            def proj(h: np.ndarray, name: str, p: str = p) -> np.ndarray:
                y = h @ w[p + name + ".weight"].T
                bias = w.get(p + name + ".bias")
                return y if bias is None else y + bias

            h = _rms(x, w[p + "attn_norm.weight"], self.eps)
            q = proj(h, "attn_q").reshape(length, self.n_heads, hd)
            k = proj(h, "attn_k").reshape(length, self.n_kv, hd)
            v = proj(h, "attn_v").reshape(length, self.n_kv, hd)
            if p + "attn_q_norm.weight" in w:
                q = _rms(q, w[p + "attn_q_norm.weight"], self.eps)
                k = _rms(k, w[p + "attn_k_norm.weight"], self.eps)
            q, k = _rope(q, self.theta, neox), _rope(k, self.theta, neox)
            heads = []
            for hh in range(self.n_heads):
                kv = hh // group
                s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(hd) + mask
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                s /= s.sum(axis=-1, keepdims=True)
                heads.append(s @ v[:, kv, :])
            x = x + proj(np.concatenate(heads, axis=-1), "attn_output")
            h = _rms(x, w[p + "ffn_norm.weight"], self.eps)
            gate = proj(h, "ffn_gate")
            x = x + proj(gate / (1 + np.exp(-gate)) * proj(h, "ffn_up"), "ffn_down")
        x = _rms(x, w["output_norm.weight"], self.eps)
        head = w.get("output.weight", w["token_embd.weight"])
        return x @ head.T


def bpe_encode(text: str, vocab: dict[str, int], merges: list[str], split_pattern: str) -> list[int]:
    """Byte-level BPE the textbook way: split with ``split_pattern``, map bytes, merge by rank."""
    import regex

    byte_chars = _bytes_to_unicode()
    ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    out: list[int] = []
    for piece in regex.findall(split_pattern, text):
        word = [byte_chars[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best = min(range(len(word) - 1), key=lambda j: ranks.get((word[j], word[j + 1]), 1 << 30))
            if (word[best], word[best + 1]) not in ranks:
                break
            word = word[:best] + [word[best] + word[best + 1]] + word[best + 2 :]
        out += [vocab[s] for s in word]
    return out


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# GPT-2's split rule; SmolLM2 ("smollm") first isolates every digit.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SMOLLM_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
