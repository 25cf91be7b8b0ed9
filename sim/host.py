"""A simulated host: one machine running one real ``CoreNode``.

Theory of operation
-------------------
A host owns what outlives its node process and what the core asks of a
driver:

- **Clock.** The host's clock is ``true_time x rate + offset`` (skew and
  drift); the core always gets the host's clock as ``now``. A clock *step*
  moves the offset; timers are kept in host time, so a step forward makes
  pending timers fire early, as on a real machine.
- **Timers.** ``SetTimer`` replaces a timer of the same key; each timer
  carries a token so a replaced or cancelled one never fires.
- **Disk.** ``PersistNode`` is the only state that survives a crash (the
  record). A full or failing disk turns the write into ``PersistFailed``,
  fed back to the node on the next tick; the record then keeps its old value.
- **Lifecycle.** A crash drops the node object, its timers, its runners and
  every message addressed to it; a restart builds a new ``CoreNode`` from the
  last record. A pause freezes the host: inputs queue up (``backlog``) and
  timers wait; on resume the backlog is handled first, then overdue timers.
- **Observations.** Periodic memory and disk telemetry (``InfoObserved``)
  and link probes (``LinkProbed``) for every address of every peer.
- **Model files.** ``disk`` (``sim.files.SimDisk``) holds what the host has
  verified and partial; it survives a crash. At boot the node is told what is
  there (``FilesObserved``, and ``ModelAvailable`` for complete copies);
  ``StartTransfer`` becomes a timed flow over the simulated links
  (``sim.files``), ``DeleteFiles`` empties the model at once.

Effects are carried out in list order, each by the host's ``carry_*`` method
for its type (``skulk.core.effects.EffectCarrier``). A handler
never re-enters the core: an input raised while the host is inside a step (a
runner answering ``DispatchTask``, a client reacting to a chunk) is queued
and handled as the next step, in order.

Invariants kept: a host feeds its node only while it runs and is not paused;
a timer fires at most once per ``SetTimer``; the record only changes through
a successful ``PersistNode``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import TYPE_CHECKING

from skulk.core.effects import (
    AppendLog,
    Effect,
    EffectCarrier,
    CancelRunnerTask,
    CancelTimer,
    CancelTransfer,
    CommandCompleted,
    DeleteFiles,
    DeliverChunk,
    DispatchTask,
    Log,
    NodeRecord,
    PersistNode,
    Send,
    SessionChanged,
    SetTimer,
    StartRunner,
    StartTransfer,
    StopRunner,
    WriteSnapshot,
)
from skulk.core.ids import ModelId, NodeId, RunnerId
from skulk.core.inputs import (
    Boot,
    InfoObserved,
    Input,
    LinkProbed,
    ModelAvailable,
    PersistFailed,
    TimerFired,
)
from skulk.core.telemetry import Memory, MemoryInfo, NetworkInfo, NetworkInterface, NodeIdentity, SystemInfo

from sim import files as simfiles
from sim.network import probe_reachable

from skulk.core.node import CoreNode

from sim.runners import SimRunner

if TYPE_CHECKING:
    from sim.world import World

__all__ = ["SimHost", "GIB"]

GIB = 1024**3
# Smallest re-wait for a timer woken a hair early: large enough to move simpy's clock.
_MIN_TIMER_WAIT_S = 1e-9


class SimHost(EffectCarrier):
    """One simulated machine. ``node`` is None while it is down."""

    def __init__(
        self,
        world: World,
        index: int,
        node_id: NodeId,
        *,
        ram_total_bytes: int,
        clock_offset_s: float,
        clock_rate: float,
        interfaces: tuple[NetworkInterface, ...],
        rng: random.Random,
    ) -> None:
        assert ram_total_bytes > 0 and clock_rate > 0
        self.world = world
        self.index = index
        self.id = node_id
        self.node: CoreNode | None = None
        self.record: NodeRecord | None = None
        self.incarnation = 0
        self.paused = False
        self.stopped_for_good = False
        self.backlog: list[Input] = []
        self.timers: dict[str, tuple[float, int]] = {}
        self._token = 0
        self.clock_offset_s = clock_offset_s
        self.clock_rate = clock_rate
        self.ram_total_bytes = ram_total_bytes
        self.ram_runner_bytes = 0
        self.interfaces = interfaces
        self.rng = rng
        # Disk faults (reference counted) and counters.
        self.disk_full = 0
        self.disk_errors = 0
        self.persist_failures = 0
        self.runners: dict[RunnerId, SimRunner] = {}
        # Model files on disk (they outlive the process) and transfers in flight.
        self.disk = simfiles.initial_disk(world, node_id)
        self.flows: dict[str, simfiles.Flow] = {}
        # Runner faults: while > 0, runners crash on load / wedge.
        self.crash_loop = 0
        self.wedge_next = 0
        self.boots = 0
        # Inputs raised while this host is inside a step (a runner reacting to
        # an effect, a client to a chunk) wait here and run right after it.
        self.busy = False
        self.pending: list[Input] = []
        self._handlers = self.effect_table()

    # --- clock -------------------------------------------------------------------

    def now(self) -> float:
        """The host's clock (what the core gets as ``now``)."""
        return self.world.env.now * self.clock_rate + self.clock_offset_s

    def step_clock(self, delta_s: float) -> None:
        """Jump the host's clock by ``delta_s`` (NTP step, manual change)."""
        self.clock_offset_s += delta_s
        self._reschedule_timers()

    @property
    def running(self) -> bool:
        return self.node is not None and not self.paused

    # --- lifecycle ---------------------------------------------------------------------

    def boot(self) -> None:
        """Start a node process from the last persisted record."""
        assert self.node is None, f"{self.id} is already up"
        assert not self.stopped_for_good, f"{self.id} was stopped for good"
        self.boots += 1
        self.node = CoreNode(self.id, self.world.core_config, cards=self.world.cards, record=self.record)
        self.paused = False
        self.world.on_boot(self)
        self.feed(Boot())
        self.feed(self._telemetry(full=True))
        for model in sorted(self.disk.verified):
            self.feed(simfiles.observed(self, model))
            if self.disk.verified[model].complete:
                self.feed(ModelAvailable(model_id=model))
        inc = self.incarnation
        self.world.call_later(self.rng.uniform(0.0, self.world.opts.telemetry_sample_s), self._telemetry_tick, inc)
        self.world.call_later(self.rng.uniform(0.0, self.world.opts.probe_interval_s), self._probe_tick, inc)
        self.world.network.refresh()

    def crash(self) -> None:
        """The process dies: the node, its timers and runners are gone; the record stays."""
        assert self.node is not None, f"{self.id} is already down"
        self.world.on_crash(self)
        self.node = None
        self.incarnation += 1
        self.paused = False
        self.backlog.clear()
        self.pending.clear()
        self.timers.clear()
        self.flows.clear()  # the process's transfers die with it; their partial bytes stay on disk
        for runner in list(self.runners.values()):
            runner.kill(notify_node=False)
        self.runners.clear()
        self.ram_runner_bytes = 0
        self.world.network.forget(self.id)
        self.world.network.refresh()

    def pause(self) -> None:
        assert self.node is not None and not self.paused
        self.paused = True
        self.world.network.refresh()

    def resume(self) -> None:
        """Thaw: handle what queued up, then overdue timers, as an event loop would."""
        assert self.paused
        self.paused = False
        backlog, self.backlog = self.backlog, []
        inc = self.incarnation
        for inp in backlog:
            if self.incarnation != inc or self.paused:
                break
            self.feed(inp)
        if self.incarnation == inc:
            self._reschedule_timers()
            self.world.network.refresh()

    # --- feeding the node ------------------------------------------------------------------

    def feed(self, inp: Input) -> None:
        """Hand ``inp`` to the node (queued while paused, dropped while down)."""
        node = self.node
        if node is None:
            return
        if self.paused:
            self.backlog.append(inp)
            return
        if self.busy:
            self.pending.append(inp)
            return
        self.world.step(self, node, inp)

    def feed_if(self, incarnation: int, inp: Input) -> None:
        """Feed only if the host has not restarted since ``incarnation``."""
        if self.incarnation == incarnation:
            self.feed(inp)

    def carry_out(self, effects: Iterable[Effect]) -> None:
        handlers = self._handlers
        for effect in effects:
            handlers[type(effect)](effect)

    # --- timers --------------------------------------------------------------------------------

    def carry_set_timer(self, effect: SetTimer) -> None:
        self._token += 1
        token = self._token
        self.timers[effect.key] = (effect.at, token)
        delay = (effect.at - self.now()) / self.clock_rate
        self.world.call_later(delay if delay > 0.0 else 0.0, self._timer_due, effect.key, token)

    def carry_cancel_timer(self, effect: CancelTimer) -> None:
        self.timers.pop(effect.key, None)

    def _timer_due(self, key: str, token: int) -> None:
        entry = self.timers.get(key)
        if entry is None or entry[1] != token:
            return  # replaced or cancelled
        if self.paused:
            return  # stays pending; resume() fires it
        at = entry[0]
        now = self.now()
        if at > now:
            # Not yet by the host's clock (it stepped back, or float rounding put
            # the wake-up a hair early): wait until the host's clock reaches it,
            # as a real event loop would. Never fire a timer before its time.
            self.world.call_later(max((at - now) / self.clock_rate, _MIN_TIMER_WAIT_S), self._timer_due, key, token)
            return
        del self.timers[key]
        self.feed(TimerFired(key=key))

    def _reschedule_timers(self) -> None:
        pending = sorted(self.timers.items(), key=lambda kv: (kv[1][0], kv[1][1]))
        now = self.now()
        for key, (at, _) in pending:
            self._token += 1
            self.timers[key] = (at, self._token)
            delay = (at - now) / self.clock_rate
            self.world.call_later(delay if delay > 0.0 else 0.0, self._timer_due, key, self._token)

    # --- disk -------------------------------------------------------------------------------------

    def _disk_write(self, what: str) -> bool:
        error = None
        if self.disk_full:
            error = "[Errno 28] No space left on device"
        elif self.disk_errors and self.rng.random() < self.world.opts.disk_error_probability:
            error = "[Errno 5] Input/output error"
        if error is None:
            return True
        self.persist_failures += 1
        self.world.call_later(0.0, self.feed_if, self.incarnation, PersistFailed(what=what, error=error))
        return False

    def carry_persist_node(self, effect: PersistNode) -> None:
        if self._disk_write("node record"):
            assert effect.record.node_id == self.id
            self.record = effect.record

    def carry_append_log(self, effect: AppendLog) -> None:
        self.world.count_append()
        self._disk_write("event log")

    def carry_write_snapshot(self, effect: WriteSnapshot) -> None:
        self._disk_write("snapshot")

    # --- network ---------------------------------------------------------------------------------------

    def carry_send(self, effect: Send) -> None:
        world = self.world
        if effect.to is None:
            send = world.network.send
            for other in world.host_ids:
                if other != self.id:
                    send(self.id, other, effect.message)
        else:
            assert effect.to != self.id, "the core loops back messages to itself"
            world.network.send(self.id, effect.to, effect.message)

    # --- runners ------------------------------------------------------------------------------------------

    def carry_start_runner(self, effect: StartRunner) -> None:
        spec = effect.spec
        old = self.runners.get(spec.runner_id)
        assert old is None or not old.alive, f"{self.id}: runner {spec.runner_id} started twice"
        self.runners[spec.runner_id] = SimRunner(self.world, self, spec)

    def carry_stop_runner(self, effect: StopRunner) -> None:
        runner = self.runners.get(effect.runner_id)
        if runner is not None and runner.alive:
            runner.stop()

    def carry_dispatch_task(self, effect: DispatchTask) -> None:
        runner = self.runners.get(effect.runner_id)
        if runner is not None and runner.alive:
            runner.dispatch(effect.task)

    def carry_cancel_runner_task(self, effect: CancelRunnerTask) -> None:
        runner = self.runners.get(effect.runner_id)
        if runner is not None and runner.alive:
            runner.cancel(effect.task_id)

    def runner_exited(self, runner: SimRunner) -> None:
        if self.runners.get(runner.spec.runner_id) is runner:
            del self.runners[runner.spec.runner_id]

    # --- towards the API -----------------------------------------------------------------------------------

    def carry_deliver_chunk(self, effect: DeliverChunk) -> None:
        self.world.clients.on_chunk(self, effect.chunk)

    def carry_command_completed(self, effect: CommandCompleted) -> None:
        self.world.clients.on_completed(self, effect.command_id, effect.result)

    def carry_session_changed(self, effect: SessionChanged) -> None:
        self.world.on_session_changed(self, effect)

    def carry_log(self, effect: Log) -> None:
        self.world.on_log(self, effect)

    # --- model files --------------------------------------------------------------------------------------------

    def carry_start_transfer(self, effect: StartTransfer) -> None:
        simfiles.start_flow(self, effect)

    def carry_cancel_transfer(self, effect: CancelTransfer) -> None:
        simfiles.cancel_flow(self, effect.transfer_id)

    def carry_delete_files(self, effect: DeleteFiles) -> None:
        self.world.notify("files_deleted", self.id, effect.model_id)
        simfiles.delete_files(self, effect.model_id)

    # --- observations --------------------------------------------------------------------------------------------

    def available_bytes(self) -> int:
        base = int(self.world.opts.ram_base_used_gib * GIB)
        return max(0, self.ram_total_bytes - base - self.ram_runner_bytes)

    def _telemetry(self, *, full: bool) -> InfoObserved:
        noise = int(self.rng.uniform(-1.0, 1.0) * self.world.opts.ram_noise_gib * GIB)
        available = max(0, min(self.ram_total_bytes, self.available_bytes() + noise))
        memory = MemoryInfo(ram_total=Memory(in_bytes=self.ram_total_bytes), ram_available=Memory(in_bytes=available))
        disk = simfiles.disk_info(self)
        if not full:
            return InfoObserved(memory=memory, disk=disk)
        return InfoObserved(
            identity=NodeIdentity(friendly_name=f"sim-{self.id}", version="sim"),
            memory=memory,
            network=NetworkInfo(interfaces=self.interfaces),
            system=SystemInfo(platform="sim", chip="simulated", os_version="0", cpu_count=8),
            disk=disk,
        )

    def _telemetry_tick(self, incarnation: int) -> None:
        if self.incarnation != incarnation or self.node is None:
            return
        self.feed(self._telemetry(full=False))
        self.world.call_later(self.world.opts.telemetry_sample_s, self._telemetry_tick, incarnation)

    def _probe_tick(self, incarnation: int) -> None:
        if self.incarnation != incarnation or self.node is None:
            return
        net = self.world.network
        for other in self.world.host_ids:
            if other == self.id:
                continue
            for link in net.links_between(self.id, other):
                self.feed(
                    LinkProbed(
                        sink=other,
                        address=link.address_of(other),
                        kind=link.label,  # type: ignore[arg-type]  (what the node advertises)
                        reachable=probe_reachable(net, self.id, other, link),
                    )
                )
        self.world.call_later(self.world.opts.probe_interval_s, self._probe_tick, incarnation)

    def models(self) -> tuple[ModelId, ...]:
        return tuple(m for m in sorted(self.disk.verified) if self.disk.verified[m].complete)
