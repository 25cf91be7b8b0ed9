"""The file keeper: which model files this node must hold, from whom to fetch them, when to give up.

Theory of operation
-------------------
The keeper holds this node's view of its own disk (``FilesObserved`` /
``FilesGone`` from the driver's scans) and of its transfers in flight, and
decides, from the replicated state, what to fetch:

- **Needs.** Every instance with a shard on this node needs that shard's
  layers (``files.need_of``). The *store node* (``CoreConfig.store_node``,
  ``SKULK_STORE``) also needs the whole of every model any instance uses, and
  of every model it was asked to download (``StoreDownloadRequested``): it
  downloads once, the others copy from it.
- **Sources**, best first (``choose_source``): a peer whose copy covers the
  need (verified, not being evicted, alive, reachable over an observed link),
  ranked by that link as rings rank links (Thunderbolt, Ethernet, Wi-Fi,
  unknown, VPN), the store node first among equals; else, if a store node is
  configured, alive and not failing this model, *wait* for it; else the hub.
  A source that failed or stalled is avoided for a backoff.
- **Stalls.** A transfer with no new byte for ``transfer_stall_s`` is
  cancelled and re-sourced: a crashed or partitioned peer, or a hub that
  stopped answering. Partial bytes stay on disk and the next source resumes
  them (a peer's partial file and the hub's share one name: the file's hash).
- **Failures** (``TransferEnded`` not ok) are remembered with their code and
  message: the copy is reported ``failed`` with the reason, the source is
  avoided, and the next attempt waits ``transfer_retry_s``, doubling up to
  ``transfer_retry_max_s``.
- **Evictions** are the master's decision (by request, or over a node's disk
  budget; ``master_policy``): when the state says ``evicting``, the keeper
  cancels any transfer and deletes the files (``DeleteFiles``).

What the keeper knows about its copies goes to the master as local events
(``ModelCopyUpdated``, ``ModelCopyRemoved``): status, verified coverage,
progress (at most every ``transfer_progress_interval_s``) and errors.

``ready(state, instance)`` is the gate the worker asks before starting a
runner: every hosting node's copy covers its shard, verified (and this node's
own disk agrees). So a runner never starts on unverified files, and no rank's
group-connect deadline runs while another rank is still receiving files.

Invariants kept: at most one transfer per model at a time; output order
never depends on set or dict iteration (models sorted); nothing is deleted
while an instance in the state uses it on this node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from skulk.core import interconnect
from skulk.core.config import CoreConfig
from skulk.core.effects import CancelTransfer, DeleteFiles, Effect, Log, StartTransfer
from skulk.core.events import DownloadCompleted, Event, ModelCopyRemoved, ModelCopyUpdated
from skulk.core.files import Coverage, ModelCopy, Need, covers, need_of, whole
from skulk.core.ids import InstanceId, ModelId, NodeId, derive_id
from skulk.core.inputs import FilesGone, FilesObserved, TransferEnded, TransferProgressed
from skulk.core.instances import Instance
from skulk.core.output import Output
from skulk.core.state import State
from skulk.core.timers import TransferRetryTimer, TransferStallTimer, cancel_timer, set_timer

__all__ = ["FileKeeper", "Source", "choose_source", "resolve_store", "HUB", "WAIT_STORE", "PERMANENT_CODES"]

# Failures an operator must act on (free disk, fix a token, fetch a model by hand):
# the instance's runner is reported failed for good, so requests fail with the reason.
PERMANENT_CODES = frozenset({"disk_full", "integrity", "not_found", "unauthorized", "offline", "invalid_model"})


@dataclass(frozen=True)
class Source:
    """Where to fetch from: the hub (``node`` None) or a peer at ``address``."""

    node: NodeId | None
    address: str = ""

    @property
    def name(self) -> str:
        return "hub" if self.node is None else f"peer:{self.node}"


HUB = Source(None)
WAIT_STORE = "store"  # no source yet: the store node will have the files


@dataclass
class _Local:
    status: Literal["staged", "verified"]
    coverage: Coverage
    bytes: int
    files: tuple[str, ...]
    source: str


@dataclass
class _Transfer:
    transfer_id: str
    source: Source
    need: Need | None
    progress_at: float
    done: int = 0
    total: int = 0
    rate: int = 0
    eta: int | None = None


@dataclass
class _Failure:
    code: str
    message: str
    source: str
    retry_at: float
    attempts: int


def resolve_store(state: State, config: CoreConfig) -> NodeId | None:
    """The store node named by ``config.store_node`` (a node id, or a friendly name), if known."""
    name = config.store_node
    if not name:
        return None
    if NodeId(name) in state.topology.nodes or NodeId(name) in state.node_identities:
        return NodeId(name)
    named = sorted(n for n, ident in state.node_identities.items() if ident.friendly_name == name)
    return named[0] if named else None


def _alive(state: State, node: NodeId, peers: frozenset[NodeId]) -> bool:
    return node in state.topology.nodes and node in peers


def choose_source(
    state: State,
    me: NodeId,
    model: ModelId,
    need: Need | None,
    *,
    peers: frozenset[NodeId],
    store: NodeId | None,
    avoid: frozenset[str] = frozenset(),
) -> Source | str | None:
    """The best source of ``need`` of ``model`` for node ``me`` (module doc), ``WAIT_STORE``, or None.

    None means every source is being avoided for now.
    """
    ranked: list[tuple[tuple[int, int, int, str], bool, NodeId, str]] = []
    for node in sorted(state.model_copies):
        if node == me or f"peer:{node}" in avoid or not _alive(state, node, peers):
            continue
        copy = state.model_copies[node].get(model)
        if copy is None or copy.usable is None:
            continue
        if not (copy.usable.complete if need is None else covers(copy.usable, need)):
            continue
        link = interconnect.best_link(state, me, node)
        if link is None:
            continue
        ranked.append((interconnect.link_sort_key(link), node != store, node, link.address))
    if ranked:
        _, _, node, address = min(ranked)
        return Source(node, address)
    if store is not None and store != me and _alive(state, store, peers) and f"peer:{store}" not in avoid:
        copy = state.model_copies.get(store, {}).get(model)
        if copy is None or copy.status in ("requested", "downloading", "staged"):
            return WAIT_STORE
    return None if HUB.name in avoid else HUB


class FileKeeper:
    """This node's model files: what it holds, what it fetches, what it reports."""

    def __init__(self, node_id: NodeId, config: CoreConfig) -> None:
        self.node_id = node_id
        self.config = config
        self.local: dict[ModelId, _Local] = {}
        self.transfers: dict[ModelId, _Transfer] = {}
        self.failures: dict[ModelId, _Failure] = {}
        self.avoid: dict[ModelId, dict[str, float]] = {}  # source name -> avoided until
        # Models waiting for the store node: (when the store last showed progress, its bytes then).
        self.waiting: dict[ModelId, tuple[float, int]] = {}
        self.evicting: set[ModelId] = set()  # DeleteFiles sent, FilesGone not back yet
        self.reported: dict[ModelId, ModelCopy] = {}
        self._reported_at: dict[ModelId, float] = {}
        self._seq = 0
        self._completed: set[ModelId] = set()  # complete copies already reported as DownloadCompleted
        # ``needs`` of the last instances mapping seen, when this node is not the store (they
        # depend on nothing else then). Mappings in a state are never changed in place, and
        # the mapping is kept, so the same object means the same needs.
        self._needs_of: tuple[dict[InstanceId, Instance], dict[ModelId, Need | None]] | None = None

    # --- what the state asks of this node -----------------------------------------------

    def needs(self, state: State) -> dict[ModelId, Need | None]:
        """Each model this node must hold and the part of it (None: every file).

        Called after every applied event; the placements behind it change rarely,
        so a node that is not the store reuses the answer for the same ``instances``.
        """
        store_here = resolve_store(state, self.config) == self.node_id
        memo = self._needs_of
        if not store_here and memo is not None and memo[0] is state.instances:
            return dict(memo[1])
        wanted: dict[ModelId, list[Need | None]] = {}
        for iid in sorted(state.instances):
            inst = state.instances[iid]
            model = inst.shard_assignments.model_id
            runner = inst.shard_assignments.node_to_runner.get(self.node_id)
            if runner is not None:
                wanted.setdefault(model, []).append(need_of(inst.shard_assignments.runner_to_shard[runner]))
        if store_here:
            for iid in sorted(state.instances):
                inst = state.instances[iid]
                n_layers = next(iter(inst.shard_assignments.runner_to_shard.values())).n_layers
                wanted.setdefault(inst.shard_assignments.model_id, []).append(whole(n_layers))
            for model, copy in sorted(state.model_copies.get(self.node_id, {}).items()):
                if copy.status == "requested" and copy.source == "hub" and model not in self.local:
                    n = copy.coverage.n_layers
                    wanted.setdefault(model, []).append(whole(n) if n > 0 else None)
        combined = {m: _combine(needs) for m, needs in sorted(wanted.items())}
        if not store_here:
            self._needs_of = (state.instances, combined)
        return dict(combined)

    def covered(self, model: ModelId, need: Need | None) -> bool:
        """Whether this node's own disk holds ``need`` of ``model``, verified."""
        local = self.local.get(model)
        if local is None or local.status != "verified" or model in self.evicting:
            return False
        return local.coverage.complete if need is None else covers(local.coverage, need)

    def ready(self, state: State, inst: Instance) -> str | None:
        """None when every hosting node holds its shard's files verified; else what is awaited."""
        model = inst.shard_assignments.model_id
        for node in sorted(inst.shard_assignments.node_to_runner):
            runner = inst.shard_assignments.node_to_runner[node]
            need = need_of(inst.shard_assignments.runner_to_shard[runner])
            copy = state.model_copies.get(node, {}).get(model)
            if copy is None or copy.status != "verified" or not covers(copy.coverage, need):
                return f"waiting for {node} to hold the files of {model}"
            if node == self.node_id and not self.covered(model, need):
                return f"waiting for this node's files of {model}"
        return None

    def problem(self, model: ModelId) -> tuple[str, str] | None:
        """(code, message) of the last failure to fetch ``model``, while it lasts."""
        fail = self.failures.get(model)
        return None if fail is None else (fail.code, fail.message)

    # --- observations ---------------------------------------------------------------------

    def on_observed(self, now: float, inp: FilesObserved, state: State) -> Output:
        model = ModelId(inp.model_id)
        self.local[model] = _Local(inp.status, inp.coverage, inp.bytes, tuple(inp.files), inp.source)
        events = self._sync(now, model, state, force=True)
        return Output(events=events)

    def on_gone(self, now: float, inp: FilesGone, state: State) -> Output:
        model = ModelId(inp.model_id)
        self.local.pop(model, None)
        self.evicting.discard(model)
        self._completed.discard(model)
        return Output(events=self._sync(now, model, state, force=True))

    def on_progress(self, now: float, inp: TransferProgressed, state: State) -> Output:
        model = ModelId(inp.model_id)
        tr = self.transfers.get(model)
        if tr is None or tr.transfer_id != inp.transfer_id:
            return Output()
        effects: list[Effect] = []
        if inp.done_bytes > tr.done:
            tr.progress_at = now
            effects.append(set_timer(TransferStallTimer(model), now + self.config.transfer_stall_s))
        tr.done, tr.total, tr.rate, tr.eta = inp.done_bytes, inp.total_bytes, inp.rate_bps, inp.eta_s
        due = now - self._reported_at.get(model, float("-inf")) >= self.config.transfer_progress_interval_s
        return Output(effects, self._sync(now, model, state, force=due))

    def on_ended(self, now: float, inp: TransferEnded, state: State) -> Output:
        """A transfer ended; the node reconciles next (another source, or the runner's start)."""
        model = ModelId(inp.model_id)
        tr = self.transfers.get(model)
        if tr is None or tr.transfer_id != inp.transfer_id:
            return Output()  # a transfer this keeper already gave up (stalled, cancelled)
        del self.transfers[model]
        effects: list[Effect] = [cancel_timer(TransferStallTimer(model))]
        if inp.ok:
            self.failures.pop(model, None)
            self.avoid.pop(model, None)
            effects.append(Log(level="info", message=f"files of {model} verified (from {tr.source.name})"))
        else:
            effects += self._fail(now, model, tr.source.name, inp.code or "internal", inp.message)
        return Output(effects, self._sync(now, model, state, force=True))

    def on_stall_timer(self, now: float, timer: TransferStallTimer, state: State) -> Output:
        """No progress for a stall period: give the source up (the node reconciles next)."""
        model = ModelId(timer.model_id)
        tr = self.transfers.get(model)
        if tr is None:
            seen = self.waiting.get(model)
            if seen is None:
                return Output()
            due = seen[0] + self.config.transfer_stall_s
            if due > now:  # the timer's own deadline, same arithmetic: never re-armed for now itself
                return Output([set_timer(TransferStallTimer(model), due)])
            # The store node shows no progress: fetch it some other way.
            del self.waiting[model]
            store = resolve_store(state, self.config)
            message = f"the store node {store} showed no progress for {self.config.transfer_stall_s:g} s"
            effects = self._fail(now, model, f"peer:{store}", "stalled", message, backoff=False)
            return Output(effects, self._sync(now, model, state, force=True))
        due = tr.progress_at + self.config.transfer_stall_s
        if due > now:  # progress came since the timer was set
            return Output([set_timer(TransferStallTimer(model), due)])
        del self.transfers[model]
        message = f"no new byte from {tr.source.name} for {self.config.transfer_stall_s:g} s"
        effects = [CancelTransfer(transfer_id=tr.transfer_id)]
        effects += self._fail(now, model, tr.source.name, "stalled", message, backoff=False)
        return Output(effects, self._sync(now, model, state, force=True))

    def _fail(self, now: float, model: ModelId, source: str, code: str, message: str, *,
              backoff: bool = True) -> list[Effect]:
        prev = self.failures.get(model)
        attempts = (prev.attempts + 1) if prev is not None else 1
        wait = min(self.config.transfer_retry_max_s, self.config.transfer_retry_s * 2 ** (attempts - 1))
        # A stall re-sources at once (another peer, the hub): only the stalled source waits.
        retry_at = now + (wait if backoff else 0.0)
        self.failures[model] = _Failure(code, message, source, retry_at, attempts)
        self.avoid.setdefault(model, {})[source] = now + wait
        effects: list[Effect] = [Log(level="warning", message=f"fetching {model} from {source} failed ({code}): {message}")]
        if retry_at > now:
            effects.append(set_timer(TransferRetryTimer(model), retry_at))
        return effects

    # --- deciding -------------------------------------------------------------------------

    def reconcile(self, now: float, state: State, peers: frozenset[NodeId]) -> Output:
        effects: list[Effect] = []
        events: list[Event] = []
        mine = state.model_copies.get(self.node_id, {})
        # Called after every applied event: the sets below are built only when there is
        # something to look up in them.
        to_evict = sorted(m for m, copy in mine.items() if copy.status == "evicting" and m not in self.evicting)
        used_here = {
            inst.shard_assignments.model_id
            for inst in state.instances.values()
            if self.node_id in inst.shard_assignments.node_to_runner
        } if to_evict else set()
        for model in to_evict:
            if model not in used_here:
                self.evicting.add(model)
                tr = self.transfers.pop(model, None)
                if tr is not None:
                    effects += [CancelTransfer(transfer_id=tr.transfer_id), cancel_timer(TransferStallTimer(model))]
                effects.append(DeleteFiles(model_id=model, reason=mine[model].error or "evicted"))
        store = resolve_store(state, self.config)
        needs = self.needs(state)
        # What no instance needs any more: stop waiting for it, forget why it failed.
        gone = sorted((set(self.waiting) | set(self.failures)) - set(needs)) if self.waiting or self.failures else []
        for model in gone:
            self.waiting.pop(model, None)
            self.failures.pop(model, None)
            events += self._sync(now, model, state, force=True)
        for model, need in needs.items():
            if model in self.evicting or self.covered(model, need):
                if self.waiting.pop(model, None) is not None:
                    events += self._sync(now, model, state, force=True)
                continue
            if model in self.transfers:
                continue
            fail = self.failures.get(model)
            if fail is not None and fail.retry_at > now:
                continue
            avoid = frozenset(s for s, until in self.avoid.get(model, {}).items() if until > now)
            source = choose_source(state, self.node_id, model, need, peers=peers, store=store, avoid=avoid)
            if source is None:
                continue  # every source is resting; a retry timer is set
            if isinstance(source, str):
                effects += self._wait_for_store(now, model, state, store)
                events += self._sync(now, model, state)
                continue
            if self.waiting.pop(model, None) is not None:
                effects.append(cancel_timer(TransferStallTimer(model)))
            self._seq += 1
            transfer_id = derive_id("transfer", self.node_id, model, self._seq)
            self.transfers[model] = _Transfer(transfer_id, source, need, progress_at=now)
            effects.append(StartTransfer(transfer_id=transfer_id, model_id=model, need=need, source=source.node,
                                         address=source.address))
            effects.append(set_timer(TransferStallTimer(model), now + self.config.transfer_stall_s))
            effects.append(Log(level="info", message=f"fetching {_what(need)} of {model} from {source.name}"))
            events += self._sync(now, model, state, force=True)
        return Output(effects, events)

    def _wait_for_store(self, now: float, model: ModelId, state: State, store: NodeId | None) -> list[Effect]:
        """Wait for the store node's copy; a store that shows no progress for a stall period is avoided."""
        copy = state.model_copies.get(store, {}).get(model) if store is not None else None
        done = copy.done_bytes + copy.bytes if copy is not None else 0
        seen = self.waiting.get(model)
        if seen is None or done > seen[1]:
            self.waiting[model] = (now, done)
            return [set_timer(TransferStallTimer(model), now + self.config.transfer_stall_s)]
        return []

    # --- reporting ------------------------------------------------------------------------

    def copy_of(self, model: ModelId, state: State) -> ModelCopy | None:
        """What this node would tell the master about its copy of ``model`` now."""
        if model in self.evicting:
            return None
        local = self.local.get(model)
        tr = self.transfers.get(model)
        fail = self.failures.get(model)
        n_layers = local.coverage.n_layers if local is not None else _n_layers(state, model, tr)
        coverage = local.coverage if local is not None and local.status == "verified" else Coverage(n_layers=n_layers)
        base = {
            "coverage": coverage,
            "bytes": local.bytes if local is not None and local.status == "verified" else 0,
            "files": local.files if local is not None and local.status == "verified" else (),
        }
        if tr is not None:
            status = "downloading" if tr.done > 0 else "requested"
            return ModelCopy(status=status, source=tr.source.name, done_bytes=tr.done, total_bytes=tr.total,
                             rate_bps=tr.rate, eta_s=tr.eta, **base)
        if model in self.waiting:
            return ModelCopy(status="requested", source=WAIT_STORE, **base)
        if fail is not None and (local is None or not _satisfied(self, model, state)):
            return ModelCopy(status="failed", source=fail.source, error=f"{fail.code}: {fail.message}", **base)
        if local is None:
            return None
        return ModelCopy(status=local.status, source=local.source, **base)

    def _sync(self, now: float, model: ModelId, state: State, *, force: bool = False) -> list[Event]:
        if model in self.evicting:
            return []  # the state says evicting; the removal is reported once the files are gone
        copy = self.copy_of(model, state)
        old = self.reported.get(model)
        events: list[Event] = []
        if copy is None:
            if old is not None:
                del self.reported[model]
                events.append(ModelCopyRemoved(node_id=self.node_id, model_id=model))
            return events
        progress_only = (old is not None and old.status == copy.status == "downloading"
                         and old.coverage == copy.coverage)
        if copy != old and (force or not progress_only):
            self.reported[model] = copy
            self._reported_at[model] = now
            events.append(ModelCopyUpdated(node_id=self.node_id, model_id=model, copy=copy))
        if copy.status == "verified" and copy.coverage.complete and model not in self._completed:
            self._completed.add(model)
            if model not in state.downloads.get(self.node_id, ()):
                events.append(DownloadCompleted(node_id=self.node_id, model_id=model))
        return events

    def rebuild(self, now: float, state: State) -> list[Event]:
        """A new master: re-report every copy this node has (the ingest drops what the state holds)."""
        self.reported.clear()
        self._completed.clear()
        events: list[Event] = []
        for model in sorted(set(self.local) | set(self.transfers) | set(self.failures) | set(self.waiting)):
            events += self._sync(now, model, state, force=True)
        # A copy the old state lists but this node no longer has.
        for model in sorted(state.model_copies.get(self.node_id, {})):
            if model not in self.local and model not in self.transfers and model not in self.failures \
                    and model not in self.waiting and state.model_copies[self.node_id][model].status != "evicting":
                events.append(ModelCopyRemoved(node_id=self.node_id, model_id=model))
        return events


def _combine(needs: list[Need | None]) -> Need | None:
    """One need that includes all of ``needs`` (None, every file, wins)."""
    if any(n is None for n in needs):
        return None
    real = [n for n in needs if n is not None]
    assert real and len({n.n_layers for n in real}) == 1, needs
    return Need(start=min(n.start for n in real), end=max(n.end for n in real), n_layers=real[0].n_layers,
                head=any(n.head for n in real))


def _what(need: Need | None) -> str:
    if need is None or need.is_whole:
        return "every file"
    return f"layers {need.start}-{need.end - 1}" + (" and the head" if need.head else "")


def _n_layers(state: State, model: ModelId, tr: _Transfer | None) -> int:
    if tr is not None and tr.need is not None:
        return tr.need.n_layers
    for inst in state.instances.values():
        if inst.shard_assignments.model_id == model:
            return next(iter(inst.shard_assignments.runner_to_shard.values())).n_layers
    for copies in state.model_copies.values():
        if model in copies and copies[model].coverage.n_layers:
            return copies[model].coverage.n_layers
    return 0


def _satisfied(keeper: FileKeeper, model: ModelId, state: State) -> bool:
    needs = keeper.needs(state)
    return model not in needs or keeper.covered(model, needs[model])
