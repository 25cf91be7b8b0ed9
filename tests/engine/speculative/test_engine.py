"""Speculative decoding in one process: exactness, load rule, stats, drafters, set-up.

The models are Skulk's generated speculation pair (``SPEC_TINY``): a target
whose upper layers refine its lower ones, a draft that is its first two
layers, and MTP heads trained on the target's own greedy output. "Plain" is
the engine without speculation on the same target, so "equal" means token for
token what a user gets without speculation.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec
import pytest
from mlx_lm.models.cache import make_prompt_cache

from skulk.core.instances import SpeculationConfig
from skulk.core.tasks import Task, TokenChunk
from skulk.engine.batch import Engine, EngineConfig
from skulk.engine.sampling import resolve_sampling
from skulk.engine.speculative.drafters import DraftModelDrafter, MtpDrafter
from skulk.engine.speculative.engine import SpeculativeEngine, Speculator, build_speculator
from skulk.engine.speculative.models import SPEC_TINY, ensure_spec_models, read_card
from skulk.engine.speculative.mtp import MTP_SIDECAR, MtpUnsupported, load_mtp
from skulk.engine.speculative.rounds import decode_stream, speculative_round
from skulk.engine.speculative.target import TargetView, cache_length
from tests.engine.helpers import check_stream, make_spec, make_task, text_of, tokens_of

PROMPTS = [
    "The quick brown fox",
    "What is the capital of France? The capital of France is",
    # Longer than one prefill chunk of the engines below.
    "Numbers like 0, 1, 2, 3 appear in code and in tables. " * 4,
]


@pytest.fixture(scope="session")
def spec_dirs(models_root: Path) -> tuple[Path, Path]:
    return ensure_spec_models(SPEC_TINY, root=models_root)


@pytest.fixture(scope="session")
def spec_loaded(spec_dirs: tuple[Path, Path]) -> Any:
    from skulk.engine.shard import load_shard

    return load_shard(spec_dirs[0], None, None)


def speculator(loaded: Any, dirs: tuple[Path, Path], drafter: str, depth: int) -> Speculator:
    config = SpeculationConfig(drafter=drafter, depth=depth, draft_model_id=str(dirs[1]))  # type: ignore[arg-type]
    spec = msgspec.structs.replace(make_spec(), speculation=config)
    built, reason = build_speculator(spec, loaded, dirs[0], None)
    assert built is not None, reason
    assert built.depth == depth and built.kind == drafter and built.placement == "local"
    return built


class Run:
    """One engine (plain or speculative) and what it emitted per task."""

    def __init__(self, loaded: Any, spec: Speculator | None = None, **config: Any) -> None:
        config.setdefault("context_ceiling", 4096)
        config.setdefault("prefill_step_tokens", 32)
        config.setdefault("prefill_chunk_tokens", 16)
        self.by_task: dict[str, list[TokenChunk]] = defaultdict(list)
        emit = lambda chunks: [self.by_task[c.task_id].append(c) for c in chunks]  # noqa: E731
        if spec is None:
            self.engine: Engine = Engine(loaded.shard, loaded.tokenizer, EngineConfig(**config), emit)
        else:
            self.engine = SpeculativeEngine(loaded.shard, loaded.tokenizer, EngineConfig(**config), emit, speculator=spec)

    def run(self, *tasks: Task, stagger: int = 0) -> list[list[TokenChunk]]:
        """Submit ``tasks`` (one every ``stagger`` steps when > 0) and drain."""
        for i, task in enumerate(tasks):
            self.engine.submit(task)
            for _ in range(stagger if i < len(tasks) - 1 else 0):
                self.engine.step()
        self.engine.drain()
        return [self.by_task[t.task_id] for t in tasks]


def greedy(prompt: str, max_tokens: int, **kw: Any) -> Task:
    return make_task(prompt=prompt, max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.mark.parametrize(("drafter", "depth"), [("draft_model", 1), ("draft_model", 4), ("mtp", 2), ("mtp", 3)])
def test_greedy_speculation_equals_plain_decoding(
    spec_loaded: Any, spec_dirs: tuple[Path, Path], drafter: str, depth: int
) -> None:
    spec = speculator(spec_loaded, spec_dirs, drafter, depth)
    plain, fast = Run(spec_loaded), Run(spec_loaded, spec)
    for prompt in PROMPTS:
        (expected,) = plain.run(greedy(prompt, 40))
        (got,) = fast.run(greedy(prompt, 40))
        final = check_stream(got)
        assert tokens_of(got) == tokens_of(expected), prompt
        assert text_of(got) == text_of(expected)
        assert final.finish_reason == expected[-1].finish_reason
        assert final.usage == expected[-1].usage
        assert final.stats is not None and final.stats.draft_depth == depth
        rate = final.stats.acceptance_rate
        assert rate is not None and 0.0 <= rate <= 1.0
        assert expected[-1].stats is not None and expected[-1].stats.acceptance_rate is None
    assert isinstance(fast.engine, SpeculativeEngine)
    # Rounds commit several tokens at once: fewer steps than tokens.
    assert 0 < fast.engine.spec_rounds < 3 * 40
    assert fast.engine.steps < plain.engine.steps


def test_acceptance_is_high_on_the_generated_pair(spec_loaded: Any, spec_dirs: tuple[Path, Path]) -> None:
    """The pair is built to agree (upper layers refine); a broken round would show as ~0 acceptance."""
    for drafter in ("draft_model", "mtp"):
        run = Run(spec_loaded, speculator(spec_loaded, spec_dirs, drafter, 2))
        rates = [run.run(greedy(p, 48))[0][-1].stats.acceptance_rate for p in PROMPTS]
        assert min(rates) > 0.2, (drafter, rates)


def test_concurrent_streams_decode_plainly_and_the_last_one_speculates(
    spec_loaded: Any, spec_dirs: tuple[Path, Path]
) -> None:
    spec = speculator(spec_loaded, spec_dirs, "draft_model", 3)
    tasks = lambda: [greedy(p, n) for p, n in zip(PROMPTS, (12, 20, 44))]  # noqa: E731
    plain = Run(spec_loaded, prefill_step_tokens=64, prefill_chunk_tokens=64).run(*tasks(), stagger=2)
    run = Run(spec_loaded, spec, prefill_step_tokens=64, prefill_chunk_tokens=64)
    fast = run.run(*tasks(), stagger=2)
    assert [tokens_of(c) for c in fast] == [tokens_of(c) for c in plain]
    for chunks in fast:
        check_stream(chunks)
    engine = run.engine
    assert isinstance(engine, SpeculativeEngine)
    # While several streams decode, steps are plain batched steps; the longest
    # stream, alone at the end, speculates.
    assert engine.spec_plain_steps >= 12 and engine.spec_rounds > 0
    assert fast[2][-1].stats.acceptance_rate is not None


def test_penalised_and_logprob_requests_decode_plainly(spec_loaded: Any, spec_dirs: tuple[Path, Path]) -> None:
    spec = speculator(spec_loaded, spec_dirs, "draft_model", 3)
    for extra in ({"repetition_penalty": 1.3}, {"logprobs": True, "top_logprobs": 2}):
        run = Run(spec_loaded, spec)
        (got,) = run.run(greedy(PROMPTS[0], 16, **extra))
        (expected,) = Run(spec_loaded).run(greedy(PROMPTS[0], 16, **extra))
        assert tokens_of(got) == tokens_of(expected)
        assert run.engine.spec_rounds == 0 and got[-1].stats.acceptance_rate is None
        if "logprobs" in extra:
            assert all(c.logprobs for c in got if c.token_ids)


@pytest.mark.parametrize("drafter", ["draft_model", "mtp"])
def test_sampled_speculation_is_seeded_and_valid(spec_loaded: Any, spec_dirs: tuple[Path, Path], drafter: str) -> None:
    spec = speculator(spec_loaded, spec_dirs, drafter, 3)
    task = lambda: make_task(prompt=PROMPTS[1], max_tokens=40, temperature=0.8, top_p=0.95, seed=4242)  # noqa: E731
    first = Run(spec_loaded, spec).run(task())[0]
    second = Run(spec_loaded, spec).run(task())[0]
    assert tokens_of(first) == tokens_of(second), "a seeded request must be reproducible"
    final = check_stream(first)
    vocab = len(spec_loaded.tokenizer)
    assert all(0 <= t < vocab for t in tokens_of(first))
    assert final.stats.acceptance_rate is not None and final.usage.completion_tokens == len(tokens_of(first))
    # top_k == 1 is greedy: speculation must then reproduce plain greedy exactly.
    (topk1,) = Run(spec_loaded, spec).run(make_task(prompt=PROMPTS[1], max_tokens=24, temperature=0.8, top_k=1))
    (plain,) = Run(spec_loaded).run(greedy(PROMPTS[1], 24))
    assert tokens_of(topk1) == tokens_of(plain)


def test_decode_stream_matches_plain_and_rolls_caches_back(spec_loaded: Any, spec_dirs: tuple[Path, Path]) -> None:
    """The standalone stream (used by bench and tune) against itself at depth 0, with cache invariants."""
    from mlx_lm.utils import load_model

    target = TargetView(spec_loaded.shard)
    model = spec_loaded.shard.model
    draft_model, _ = load_model(spec_dirs[1])
    draft = TargetView(draft_model)
    heads = load_mtp(model, spec_dirs[0], spec_loaded.config)
    ids = spec_loaded.tokenizer.encode(PROMPTS[1])
    plain = decode_stream(target, lambda: make_prompt_cache(model), ids, 30)
    (engine_plain,) = Run(spec_loaded).run(greedy(PROMPTS[1], 30))
    assert plain.tokens == tokens_of(engine_plain)
    for depth in (1, 2, 4):
        for drafter in (DraftModelDrafter(draft, lambda: make_prompt_cache(draft_model)), MtpDrafter(heads, target)):
            got = decode_stream(target, lambda: make_prompt_cache(model), ids, 30, drafter=drafter, depth=depth)
            assert got.tokens == plain.tokens, (type(drafter).__name__, depth)
            assert sum(got.per_round) == len(got.tokens) - 1 and got.accepted <= got.drafted
            assert max(got.per_round) <= depth + 1

    # One round by hand: the target cache grows by exactly accepted + 1.
    cache = make_prompt_cache(model)
    logits, _ = target.forward(mx.array(ids, dtype=mx.uint32), cache)
    bonus = int(mx.argmax(logits[-1]).item())
    drafter = DraftModelDrafter(draft, lambda: make_prompt_cache(draft_model))
    drafter.extend(ids)
    before = cache_length(cache)
    outcome = speculative_round(target, cache, drafter, bonus, 4, None, (0, 1))
    assert cache_length(cache) == before + outcome.accepted + 1
    assert drafter.known == len(ids) + 1 + outcome.accepted
    assert cache_length(drafter.cache) + len(drafter.pending) == drafter.known


def test_sampled_decode_stream_draws_from_the_warped_target(spec_loaded: Any, spec_dirs: tuple[Path, Path]) -> None:
    """With top_k=2 only the target's two best tokens may ever be committed, drafted or not."""
    from mlx_lm.utils import load_model

    target = TargetView(spec_loaded.shard)
    model = spec_loaded.shard.model
    draft_model, _ = load_model(spec_dirs[1])
    draft = TargetView(draft_model)
    ids = spec_loaded.tokenizer.encode(PROMPTS[0])
    sampling = resolve_sampling(make_task(temperature=1.0, top_k=2, seed=9).params)
    drafter = DraftModelDrafter(draft, lambda: make_prompt_cache(draft_model))
    got = decode_stream(target, lambda: make_prompt_cache(model), ids, 24, drafter=drafter, depth=3, sampling=sampling)
    full = model(mx.array(ids + got.tokens[:-1], dtype=mx.uint32)[None])[0, len(ids) - 1 :]
    top2 = mx.argsort(-full, axis=-1)[:, :2].tolist()
    assert all(token in allowed for token, allowed in zip(got.tokens, top2))


def test_mtp_weights_load_from_a_deepseek_layout(spec_loaded: Any, spec_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """Qwen3-Next ``mtp.*`` keys and DeepSeek ``model.layers.<n>.*`` keys give the same heads."""
    target_dir = spec_dirs[0]
    model = spec_loaded.shard.model
    sidecar = load_mtp(model, target_dir, spec_loaded.config)
    n = spec_loaded.n_layers
    renames = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm", "norm": "shared_head.norm"}
    deepseek = {}
    for key, value in mx.load(str(target_dir / MTP_SIDECAR)).items():
        rest = key[len("mtp.") :]
        head, _, tail = rest.partition(".")
        if head == "layers":
            block, _, tail = tail.partition(".")
            assert block in ("0", "1")
            # A DeepSeek MTP layer holds one block; keep the layout honest by
            # using a one-block copy when the sidecar has more.
            if block != "0":
                continue
            deepseek[f"model.layers.{n}.{tail}"] = value
        else:
            deepseek[f"model.layers.{n}.{renames[head]}.{tail}"] = value
    ds_dir = tmp_path / "deepseek"
    ds_dir.mkdir()
    shutil.copy(target_dir / "config.json", ds_dir / "config.json")
    mx.save_safetensors(str(ds_dir / "model-mtp.safetensors"), deepseek)
    (ds_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-mtp.safetensors" for k in deepseek}})
    )
    loaded = load_mtp(model, ds_dir, spec_loaded.config)
    assert loaded.count == 1 and len(loaded.modules_[0].layers) == 1
    from mlx.utils import tree_flatten

    ds = dict(tree_flatten(loaded.parameters()))
    ref = dict(tree_flatten(sidecar.parameters()))
    for key, value in ds.items():
        assert mx.array_equal(value, ref[key]), key
    with pytest.raises(MtpUnsupported, match="no MTP weights"):
        load_mtp(model, spec_dirs[1], spec_loaded.config)


def test_build_speculator_reports_why_it_cannot_speculate(
    spec_loaded: Any, spec_dirs: tuple[Path, Path], models_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Model ids resolve under the session's models root, never the user's.
    monkeypatch.setenv("SKULK_MODELS_DIR", str(models_root))

    def build(config: SpeculationConfig, path: Path) -> tuple[Any, str]:
        return build_speculator(msgspec.structs.replace(make_spec(), speculation=config), spec_loaded, path, None)

    assert build(SpeculationConfig(), spec_dirs[0]) == (None, "speculation not configured for this instance")
    missing, reason = build(SpeculationConfig(drafter="mtp", depth=2), spec_dirs[1])
    assert missing is None and "MTP" in reason
    unknown, reason = build(SpeculationConfig(drafter="draft_model", depth=2, draft_model_id="no/such-model"), spec_dirs[0])
    assert unknown is None and "no/such-model" in reason
    # Depth 0 means "the card's depth".
    card_depth, _ = build(SpeculationConfig(drafter="mtp", depth=0), spec_dirs[0])
    assert card_depth is not None and card_depth.depth == read_card(spec_dirs[0]).mtp_max_depth == SPEC_TINY.mtp_max_depth
    # The card names the draft: no id needed.
    by_card, reason = build(SpeculationConfig(drafter="draft_model", depth=2), spec_dirs[0])
    assert read_card(spec_dirs[0]).draft_model == SPEC_TINY.draft_id
    assert by_card is not None and by_card.kind == "draft_model", reason


def test_generated_models_are_consistent(spec_dirs: tuple[Path, Path]) -> None:
    target_dir, draft_dir = spec_dirs
    target, draft = read_card(target_dir), read_card(draft_dir)
    assert target.n_layers == SPEC_TINY.target.num_hidden_layers and draft.n_layers == SPEC_TINY.draft_layers
    assert target.draft_model == SPEC_TINY.draft_id and target.mtp_max_depth == SPEC_TINY.mtp_max_depth
    assert (target_dir / MTP_SIDECAR).is_file()
    weights = sum(p.stat().st_size for p in target_dir.glob("*.safetensors"))
    assert target.weight_bytes == weights, "the card counts the MTP sidecar the runner loads"
    assert json.loads((target_dir / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert (target_dir / "tokenizer.json").read_bytes() == (draft_dir / "tokenizer.json").read_bytes()
    report = json.loads((target_dir / "skulk_spec.json").read_text())
    assert report["mtp"]["agreement_after"] >= report["mtp"]["agreement_before"]
