"""Small random-weight models of real architectures, for tests that need an exact architecture.

Theory of operation
-------------------
A built-in card names a real model (Gemma 3, gpt-oss, DeepSeek-V3...) far
too large to run here. What a correctness test needs is not its weights but
its *architecture*: the same mlx-lm model class, the same kinds of layers in
the same pattern (sliding-window and full attention, mixtures of experts,
latent attention), the same cache types. ``ARCH_CONFIGS`` holds, per family,
the real model's ``config.json`` keys with the layer count and widths shrunk
and everything structural kept (layer-type patterns, window sizes relative to
the test prompts, expert counts, head layouts that still divide by 2).

``write_arch_model(family, dest)`` builds the mlx-lm ``Model`` from that
config, draws every parameter with NumPy from a seeded PCG64 generator (so
every machine writes the same bytes), and writes an mlx-lm directory with
the tiny preset's tokenizer and a Skulk card. Scales follow the generated
presets: unit embeddings, ``1/sqrt(fan_in)`` matrices, norms near one with
some spread (a norm applied in the wrong place changes the answer), and an
output head with logits of standard deviation about 2.5, so greedy choices
stand far above float32 reduction-order noise and one process, pipeline
ranks and tensor ranks pick the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from skulk.engine.models import CHATML_TEMPLATE, SPECIAL_TOKENS, train_tokenizer, write_model_card

__all__ = ["ARCH_CONFIGS", "VOCAB_TARGET", "arch_config", "write_arch_model"]

VOCAB_TARGET = 512

# Shrunk configs, by family (the card's ``family``, i.e. config.json's model_type).
# Every width divides by 2 and every layer count by 2 (two pipeline stages, two
# tensor ranks); vocab_size is filled in from the tokenizer.
ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    # Llama 3: untied head, plain causal attention.
    "llama": {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
    # Mistral Small 3: mlx-lm runs it as llama; head_dim * heads != hidden.
    "mistral": {
        "model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-5,
        "rope_theta": 100000000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
    # Qwen2.5: biases on Q/K/V, tied head.
    "qwen2": {
        "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": True,
    },
    # Qwen3: Q/K norms, explicit head_dim.
    "qwen3": {
        "model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 2048, "tie_word_embeddings": True,
    },
    # Qwen3 MoE (30B-A3B, 235B-A22B): every layer a mixture of experts, top-k with renormalised weights.
    "qwen3_moe": {
        "model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8,
        "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": 32,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "norm_topk_prob": True,
    },
    # Gemma 3 (27B): sliding window on 5 of every 6 layers; 8 layers put the global layer (5) and a
    # pipeline boundary (4) mid-pattern. The window (8) is shorter than the test prompts. Tied head.
    "gemma3": {
        "model_type": "gemma3",
        "text_config": {
            "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 8, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 32,
            "sliding_window": 8, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        },
        "_tied": "language_model.lm_head.weight",
    },
    # Gemma 4 (31B, dense): sliding layers with 2 KV heads of dim 32, every 6th layer global with one
    # shared K=V head of dim 64 and partial rotary, and the last layer global (as the real model's);
    # final logit soft-capping; tied head.
    "gemma4": {
        "model_type": "gemma4",
        "text_config": {
            "model_type": "gemma4_text", "hidden_size": 64, "num_hidden_layers": 8, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "global_head_dim": 64,
            "num_global_key_value_heads": 1, "attention_k_eq_v": True, "num_kv_shared_layers": 0,
            "hidden_size_per_layer_input": 0, "sliding_window": 8, "sliding_window_pattern": 6,
            "use_double_wide_mlp": False, "final_logit_softcapping": 30.0, "max_position_embeddings": 2048,
            "layer_types": ["sliding_attention"] * 5 + ["full_attention", "sliding_attention", "full_attention"],
            "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
        },
    },
    # gpt-oss (20B, 120B): alternating sliding-window (128 real, 8 here) and full layers, attention sinks,
    # biased projections, a mixture of experts in every layer, YaRN rope.
    "gpt_oss": {
        "model_type": "gpt_oss", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 64,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
        "num_experts_per_tok": 2, "sliding_window": 8, "rope_theta": 150000,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096},
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
    },
    # DeepSeek-V3: multi-head latent attention (compressed KV), a dense first layer, then shared plus
    # routed experts with grouped sigmoid routing; YaRN rope.
    "deepseek_v3": {
        "model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
        "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 48,
        "qk_rope_head_dim": 16, "v_head_dim": 32, "qk_nope_head_dim": 32, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "n_group": 2, "topk_group": 1,
        "num_experts_per_tok": 2, "moe_layer_freq": 1, "first_k_dense_replace": 1,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
    },
}  # fmt: skip


def arch_config(family: str, vocab_size: int) -> dict[str, Any]:
    """The shrunk ``config.json`` of ``family`` for a vocabulary of ``vocab_size``."""
    if family not in ARCH_CONFIGS:
        raise KeyError(f"no shrunk config for {family!r}; known: {sorted(ARCH_CONFIGS)}")
    config = {k: v for k, v in json.loads(json.dumps(ARCH_CONFIGS[family])).items() if not k.startswith("_")}
    config["vocab_size"] = vocab_size
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["vocab_size"] = vocab_size
    return config


_BRANCH_GAIN = 4.0


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator, *, tied: bool) -> np.ndarray:
    leaf = name.rsplit(".", 2)[-2:]
    if len(shape) == 1 and ("norm" in name or "layernorm" in name) and leaf[-1] == "weight":
        return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    if "embed_tokens" in name:
        # A tied embedding is also the head: scale it for logits of standard deviation about 2.5.
        scale = 2.5 / np.sqrt(shape[-1]) if tied else 1.0
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
    if name.endswith("lm_head.weight"):
        return (rng.standard_normal(shape, dtype=np.float32) * (2.5 / np.sqrt(shape[-1]))).astype(np.float32)
    if len(shape) == 1:
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = shape[-1]
    # Residual branches write with weight: with a tied head, the token's own embedding would otherwise
    # dominate the last hidden state and greedy decoding would repeat the input token.
    gain = _BRANCH_GAIN if tied and name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
    return (rng.standard_normal(shape, dtype=np.float32) * (gain / np.sqrt(fan_in))).astype(np.float32)


def write_arch_model(
    family: str,
    dest: Path,
    *,
    model_id: str | None = None,
    seed: int = 20261203,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight mlx-lm directory of ``family``'s shrunk architecture at ``dest``.

    Output: ``dest`` (must not exist). Deterministic for a given family, seed
    and ``overrides`` (config keys replacing the shrunk ones, for tests that
    need other widths). The card's id is ``model_id`` (default
    ``skulk/arch-<family>``).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes as get_model_classes

    assert not Path(dest).exists(), dest
    dest = Path(dest)
    dest.mkdir(parents=True)
    tokenizer = train_tokenizer(VOCAB_TARGET)
    vocab_size = tokenizer.get_vocab_size()
    eos_ids = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    config = {**arch_config(family, vocab_size), **(overrides or {})}
    config["eos_token_id"] = eos_ids
    config["torch_dtype"] = "float32"
    model_class, args_class = get_model_classes(config)
    model = model_class(args_class.from_dict(config))
    tied = ARCH_CONFIGS[family].get("_tied")  # a head the real checkpoint does not ship (tied at load)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters()) if k != tied}
    rng = np.random.Generator(np.random.PCG64(seed + sum(family.encode())))
    tied_head = not any(k.endswith("lm_head.weight") for k in shapes)
    weights = {name: mx.array(_draw(name, shapes[name], rng, tied=tied_head)) for name in sorted(shapes)}
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": {k: "model.safetensors" for k in sorted(weights)}}  # fmt: skip
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save(str(dest / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 2048, "chat_template": CHATML_TEMPLATE,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
    }  # fmt: skip
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    write_model_card(dest, model_id=model_id or f"skulk/arch-{family}")
    return dest
