"""Generated models for speculation: a target with MTP heads and a high-agreement draft.

Theory of operation
-------------------
Random weights agree on nothing, so speculation needs models built for it.
``ensure_spec_models`` produces, for a ``SpecPreset``:

- the *target*: a Qwen2 model written by ``skulk.engine.models.generate_model``
  (same tokenizer, chat template and seeded weights as every Skulk preset),
  whose decoder layers from ``draft_layers`` on have their residual-branch
  output projections (``o_proj``, ``down_proj``) scaled by ``upper_scale``.
  The upper layers then *refine* the lower layers' prediction rather than
  replace it, as in trained LLMs where early-exit heads agree with the final
  head on most tokens. ``upper_scale`` sets how often they agree;
- the *draft*: a cheap truncation of the target, its first ``draft_layers``
  layers with the same embeddings, final norm and head (a separate model
  directory and model id sharing the tokenizer);
- *MTP heads* for the target (Qwen3-Next layout, sidecar ``mtp.safetensors``,
  ``num_nextn_predict_layers = 1`` in ``config.json``): blocks copied from
  the target's first layers, ``fc`` passing the next token's embedding
  through, then up to ``mtp_train_steps`` Adam steps on the target's own
  greedy choices in contexts it generated itself, keeping the snapshot with
  the best held-out agreement (``_train_mtp``). Figures go to
  ``skulk_spec.json`` in the target's directory.

The target's card names the draft (``draft_model``) and carries
``mtp_max_depth``; ``weight_bytes`` includes the MTP sidecar, which the runner
loads too.

Everything is seeded (MLX's CPU arithmetic makes the trained heads
reproducible on one machine, not byte-identical across machines, unlike
``skulk.engine.models``); directories appear atomically (written to a temporary
sibling and renamed), so concurrent callers never see half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from skulk.core.cards import card_from_toml, card_to_toml
from skulk.engine.models import CARD_FILENAME, ModelPreset, generate_model
from skulk.paths import models_dir

__all__ = [
    "SpecPreset",
    "SPEC_PRESETS",
    "SPEC_TINY",
    "SPEC_BENCH",
    "ensure_spec_models",
    "spec_model_path",
    "update_card_runtime",
    "read_card",
]


@dataclass(frozen=True)
class SpecPreset:
    """A target/draft pair (and the target's MTP heads); see the module docstring."""

    name: str
    target: ModelPreset
    draft_id: str
    draft_layers: int
    upper_scale: float
    mtp_train_steps: int
    mtp_max_depth: int
    mtp_blocks: int = 1
    mtp_sequences: int = 128
    mtp_sequence_tokens: int = 64
    mtp_learning_rate: float = 3e-4

    def __post_init__(self) -> None:
        assert 0 < self.draft_layers < self.target.num_hidden_layers, (self.draft_layers, self.target)
        assert 0.0 < self.upper_scale <= 1.0, self.upper_scale
        assert self.mtp_train_steps >= 0 and self.mtp_max_depth >= 1


SPEC_TINY = SpecPreset(
    name="tiny",
    target=ModelPreset(
        model_id="skulk/spec-tiny-target",
        hidden_size=128,
        num_hidden_layers=6,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_target=1024,
        context_length=8192,
        seed=20240711,
    ),
    draft_id="skulk/spec-tiny-draft",
    draft_layers=2,
    upper_scale=0.1,
    mtp_train_steps=20,
    mtp_max_depth=3,
    mtp_blocks=2,
    mtp_sequences=48,
    mtp_sequence_tokens=48,
)

SPEC_BENCH = SpecPreset(
    name="bench",
    target=ModelPreset(
        model_id="skulk/spec-target-qwen2",
        hidden_size=256,
        num_hidden_layers=16,
        intermediate_size=768,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_target=2048,
        context_length=8192,
        seed=20240712,
    ),
    draft_id="skulk/spec-draft-qwen2",
    draft_layers=1,
    upper_scale=0.025,
    mtp_train_steps=100,
    mtp_max_depth=3,
)

SPEC_PRESETS: dict[str, SpecPreset] = {p.name: p for p in (SPEC_TINY, SPEC_BENCH)}


def _dir_for(model_id: str, root: Path) -> Path:
    assert model_id and not model_id.startswith("/") and ".." not in model_id.split("/"), model_id
    return root.joinpath(*model_id.split("/"))


def spec_model_path(model_id: str, root: Path | None = None) -> Path:
    """Where ``ensure_spec_models`` puts ``model_id`` under ``root`` (default ``models_dir()``)."""
    return _dir_for(model_id, Path(root) if root is not None else models_dir())


def read_card(model_dir: Path) -> Any:
    """The ``ModelCard`` in ``model_dir/model_card.toml``."""
    path = Path(model_dir) / CARD_FILENAME
    return card_from_toml(path.read_text(), source=str(path))


def update_card_runtime(card_or_dir: Path, **changes: Any) -> Path:
    """Rewrite a card (a TOML path, or a model directory's card) with ``changes`` applied.

    ``changes`` are ``ModelCard`` field names. The card is re-validated and
    written in the canonical layout (comments are not kept); the file is
    replaced atomically. Returns its path.
    """
    path = Path(card_or_dir)
    path = path / CARD_FILENAME if path.is_dir() else path
    card = card_from_toml(path.read_text(), source=str(path))
    card = msgspec.structs.replace(card, **changes)
    text = card_to_toml(card)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _save_weights(dest: Path, arrays: dict[str, Any]) -> None:
    import mlx.core as mx

    mx.save_safetensors(str(dest / "model.safetensors"), arrays, metadata={"format": "mlx"})
    index = {
        "metadata": {
            "total_size": sum(int(a.nbytes) for a in arrays.values()),
            "total_parameters": sum(int(a.size) for a in arrays.values()),
        },
        "weight_map": {k: "model.safetensors" for k in sorted(arrays)},
    }
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _scale_upper_layers(target_dir: Path, preset: SpecPreset) -> None:
    import mlx.core as mx

    weights = dict(mx.load(str(target_dir / "model.safetensors")))
    scaled = 0
    for name in sorted(weights):
        parts = name.split(".")
        if len(parts) > 3 and parts[1] == "layers" and int(parts[2]) >= preset.draft_layers:
            if parts[-2] in ("o_proj", "down_proj"):
                weights[name] = weights[name] * preset.upper_scale
                scaled += 1
    upper = preset.target.num_hidden_layers - preset.draft_layers
    assert scaled == 2 * upper, (scaled, upper)
    _save_weights(target_dir, weights)


def _write_draft(target_dir: Path, draft_dir: Path, preset: SpecPreset) -> None:
    import mlx.core as mx

    draft_dir.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(target_dir / name, draft_dir / name)
    config = json.loads((target_dir / "config.json").read_text())
    config["num_hidden_layers"] = preset.draft_layers
    config.pop("num_nextn_predict_layers", None)
    config["skulk_generated"] = {"truncation_of": preset.target.model_id, "layers": preset.draft_layers}
    (draft_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    weights = dict(mx.load(str(target_dir / "model.safetensors")))
    kept = {}
    for name, value in weights.items():
        parts = name.split(".")
        if len(parts) > 3 and parts[1] == "layers" and int(parts[2]) >= preset.draft_layers:
            continue
        kept[name] = value
    _save_weights(draft_dir, kept)
    from skulk.engine.models import write_model_card

    write_model_card(draft_dir, model_id=preset.draft_id)


# Prompts for the MTP training sequences (any text works with a byte-level BPE).
_PROMPTS = (
    "A skulk of foxes crossed the frozen field at dawn, one behind the other.",
    "The cluster joins several machines into one and serves models larger than any one of them.",
    "Tokens stream back to the client one at a time, while the runner keeps its cache warm.",
    "The quick brown fox jumps over the lazy dog.",
    "In the morning the market opens and the baker lights the oven.",
    "She wrote the numbers down: one, two, three, four, five, six.",
    "def generate(prompt, max_tokens=16):",
    "The river runs north through the valley, past the old mill.",
    "What is the capital of France? The capital of France is Paris.",
    "Please summarize the following text in one sentence.",
    "Every request carries its own sampling settings: temperature, top p, top k.",
    "He asked, are you coming with us tonight?",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.",
    "Red, orange, yellow, green, blue, indigo and violet.",
    "<|im_start|>user\nTell me a short story about a fox.<|im_end|>\n<|im_start|>assistant\n",
    "Memory is limited, so the placement splits the layers across nodes.",
)


def _target_sequences(model: Any, tokenizer: Any, preset: SpecPreset) -> list[list[int]]:
    """Prompts continued by the target itself, as one batch: the MTP heads' training contexts.

    Continuations are *sampled* (temperature 1, fixed key) so the contexts are
    varied; the training labels are the target's greedy choices in those
    contexts. Every prompt is cut to the shortest prompt's token count so the
    batch needs no padding (later passes over the prompts start further in).
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    encoded = [tokenizer.encode(p).ids for p in _PROMPTS]
    width = min(len(e) for e in encoded)
    assert width >= 4, width
    prompts = []
    for i in range(preset.mtp_sequences):
        ids = encoded[i % len(encoded)]
        offset = min(len(ids) - width, i // len(encoded))
        prompts.append(ids[offset : offset + width])
    cache = make_prompt_cache(model)
    batch = mx.array(prompts, dtype=mx.uint32)
    logits = model(batch, cache=cache)
    columns = [batch]
    key = mx.random.key(preset.target.seed)
    for step in range(preset.mtp_sequence_tokens - width):
        nxt = mx.random.categorical(logits[:, -1], key=mx.random.split(key, step + 2)[step + 1]).astype(mx.uint32)[:, None]
        columns.append(nxt)
        logits = model(nxt, cache=cache)
        mx.async_eval(logits)
    return mx.concatenate(columns, axis=1).tolist()


def _train_mtp(target_dir: Path, preset: SpecPreset) -> dict[str, float]:
    """Build, train and save the target's MTP heads; returns loss and agreement figures.

    The MTP blocks start as copies of the target's first ``mtp_blocks``
    decoder layers and ``fc`` starts by passing the next token's embedding
    through (its hidden-state half at zero): the head begins as a truncation
    of the target run one token ahead. Adam then trains every MTP weight for
    ``mtp_train_steps`` steps to predict the target's next-next greedy
    token (cross-entropy against the target's argmax: its own greedy output),
    using the target's hidden states too.
    ``agreement_*`` figures are teacher-forced top-1 agreement with the
    target on held-out sequences (a quarter of them), before and after
    training; the weights kept are the best seen on that held-out set.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import load_model
    from tokenizers import Tokenizer

    from skulk.engine.speculative.mtp import new_mtp_heads, save_mtp
    from skulk.engine.speculative.target import TargetView

    mx.random.seed(preset.target.seed)
    model, _ = load_model(target_dir)
    model.freeze()
    view = TargetView(model)
    tokenizer = Tokenizer.from_file(str(target_dir / "tokenizer.json"))
    data = mx.array(_target_sequences(model, tokenizer, preset), dtype=mx.uint32)
    hidden = model.model(data)  # (N, L, H), post-norm
    target_lp = nn.log_softmax(view.head(hidden), axis=-1)
    mx.eval(hidden, target_lp)
    # Position i sees (h_i, t_{i+1}) and learns the target's greedy token at i + 1.
    h_in = hidden[:, :-2]
    next_tokens = data[:, 1:-1]
    labels = mx.argmax(target_lp[:, 1:-1], axis=-1)
    n_train = max(1, (3 * int(data.shape[0])) // 4)

    heads = new_mtp_heads(model, n_blocks=preset.mtp_blocks)
    module = heads.modules_[0]
    for j, block in enumerate(module.layers):
        block.update(tree_unflatten(tree_flatten(model.model.layers[j].parameters())))
    width = int(module.fc.weight.shape[0])
    module.fc.weight = mx.concatenate([mx.eye(width), mx.zeros((width, width))], axis=1)
    embed = model.model.embed_tokens

    def mtp_logprobs(mod: Any, h: mx.array, tok: mx.array) -> mx.array:
        x = mod.fc(mx.concatenate([mod.pre_fc_norm_embedding(embed(tok)), mod.pre_fc_norm_hidden(h)], axis=-1))
        for layer in mod.layers:
            x = layer(x, "causal", None)
        return nn.log_softmax(view.head(mod.norm(x)), axis=-1)

    def loss_fn(mod: Any, h: mx.array, tok: mx.array, y: mx.array) -> mx.array:
        lp = mtp_logprobs(mod, h, tok)
        return -mx.mean(mx.take_along_axis(lp, y[..., None], axis=-1))

    def agreement() -> float:
        lp = mtp_logprobs(module, h_in[n_train:], next_tokens[n_train:])
        same = mx.argmax(lp, axis=-1) == labels[n_train:]
        return float(mx.mean(same.astype(mx.float32)).item())

    # The blocks stay the target's own layers; training fits how the target's
    # hidden state mixes in (fc) and the norms: few weights, so little data suffices.
    for block in module.layers:
        block.freeze()
    before = agreement()
    # Early stopping on held-out agreement: the data set is small, so training
    # past its best point only memorises; the best snapshot (possibly the
    # initial one) is what gets saved.
    best, best_params = before, tree_flatten(module.parameters())
    optimizer = optim.Adam(learning_rate=preset.mtp_learning_rate)
    step_fn = nn.value_and_grad(module, loss_fn)
    batch = min(8, n_train)
    first = last = 0.0
    for step in range(preset.mtp_train_steps):
        idx = mx.random.randint(0, n_train, (batch,), key=mx.random.key(preset.target.seed + step))
        loss, grads = step_fn(module, h_in[idx], next_tokens[idx], labels[idx])
        optimizer.update(module, grads)
        mx.eval(module.parameters(), optimizer.state, loss)
        first = float(loss.item()) if step == 0 else first
        last = float(loss.item())
        if (step + 1) % 10 == 0:
            now = agreement()
            if now > best:
                best, best_params = now, tree_flatten(module.parameters())
    module.update(tree_unflatten(best_params))
    after = agreement()
    assert after == best, (after, best)
    save_mtp(heads, target_dir)
    config = json.loads((target_dir / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (target_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return {
        "first_loss": first,
        "last_loss": last,
        "steps": float(preset.mtp_train_steps),
        "agreement_before": before,
        "agreement_after": after,
    }


def _generate(preset: SpecPreset, staging: Path) -> tuple[Path, Path]:
    target_dir = generate_model(preset.target, staging / "target")
    _scale_upper_layers(target_dir, preset)
    _write_draft(target_dir, staging / "draft", preset)
    report = _train_mtp(target_dir, preset)
    from skulk.engine.models import write_model_card

    # derive_card counts every *.safetensors file, the MTP sidecar included.
    write_model_card(target_dir, model_id=preset.target.model_id)
    update_card_runtime(
        target_dir,
        mtp_max_depth=preset.mtp_max_depth,
        draft_model=preset.draft_id,
    )
    (target_dir / "skulk_spec.json").write_text(
        json.dumps({"preset": preset.name, "draft": preset.draft_id, "upper_scale": preset.upper_scale, "mtp": report}, indent=2)
    )
    return target_dir, staging / "draft"


def ensure_spec_models(preset: SpecPreset | str = SPEC_TINY, *, root: Path | None = None) -> tuple[Path, Path]:
    """Return (target dir, draft dir) for ``preset``, generating them when missing.

    Safe to call from several processes: each generates privately and
    renames into place; the first rename wins.
    """
    if isinstance(preset, str):
        if preset not in SPEC_PRESETS:
            raise KeyError(f"unknown speculation preset {preset!r}; presets: {sorted(SPEC_PRESETS)}")
        preset = SPEC_PRESETS[preset]
    root = Path(root) if root is not None else models_dir()
    target_final = _dir_for(preset.target.model_id, root)
    draft_final = _dir_for(preset.draft_id, root)
    done = all((d / "config.json").is_file() and (d / CARD_FILENAME).is_file() for d in (target_final, draft_final))
    if done and (target_final / "mtp.safetensors").is_file():
        return target_final, draft_final
    target_final.parent.mkdir(parents=True, exist_ok=True)
    draft_final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{preset.name}-spec.tmp-", dir=target_final.parent))
    try:
        target_dir, draft_dir = _generate(preset, staging)
        for built, final in ((draft_dir, draft_final), (target_dir, target_final)):
            try:
                os.rename(built, final)
            except OSError:
                if not (final / "config.json").is_file():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target_final, draft_final
