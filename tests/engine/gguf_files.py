"""Writing small GGUF files for the import tests, the way llama.cpp's converter does.

``write_gguf(model_dir, out, types)`` takes an mlx-lm directory of float32
weights (llama, qwen2 or qwen3) and writes the same weights as a GGUF file
with the ``gguf`` package: llama.cpp's tensor names, its Q/K row permutation
for llama (``convert_hf_to_gguf.LlamaModel.permute``), its metadata keys,
and the byte-level BPE tokenizer as ``tokenizer.ggml.*`` lists. ``types``
chooses each tensor's GGML type (float32 when it answers None); K-quant
blocks, which the ``gguf`` package cannot encode, are built directly from
valid random bytes (``raw_k_quant``).

Written independently of ``skulk.engine.gguf`` (only the file format is shared).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    assert parts[:2] == ["model", "layers"], name
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{_NAMES[module]}.{parts[-1]}"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def raw_k_quant(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid blocks of a K-quant type (finite float16 super-block scales)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert cols % block == 0
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = (rng.uniform(0.001, 0.01, size=(rows, cols // block, 2))).astype(np.float16).view(np.uint8)
    if kind == "Q6_K":  # ql[128] qh[64] scales[16] d
        raw[..., 208:210] = scales[..., 0:2]
    else:  # Q4_K, Q5_K: d, dmin, scales[12], ...
        assert kind in ("Q4_K", "Q5_K"), kind
        raw[..., 0:4] = scales
    return raw.reshape(rows, -1)


def write_gguf(
    model_dir: Path,
    out: Path,
    *,
    types: Callable[[str], str | None] = lambda name: None,
    pre: str = "default",
    seed: int = 7,
) -> Path:
    import gguf
    import mlx.core as mx
    from gguf import quants

    config = json.loads((model_dir / "config.json").read_text())
    arch = config["model_type"]
    weights = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(f"test {arch}")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    w.add_vocab_size(config["vocab_size"])
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv_: kv_[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"])
    for name in sorted(weights):
        a = weights[name]
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            a = llama_permute(a, heads)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            a = llama_permute(a, kv)
        kind = types(name)
        target = gguf_name(name)
        if kind is None or a.ndim == 1:
            w.add_tensor(target, np.ascontiguousarray(a, dtype=np.float32))
        elif kind in ("F16",):
            w.add_tensor(target, a.astype(np.float16))
        elif kind.endswith("_K"):
            raw = raw_k_quant(kind, a.shape[0], a.shape[1], rng)
            w.add_tensor(target, raw, raw_dtype=gguf.GGMLQuantizationType[kind])
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(target, quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
