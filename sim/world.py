"""The simulated world: one simpy environment, its hosts, network, runners and clients.

Theory of operation
-------------------
``World(opts)`` builds everything a run needs from its options: ``n`` hosts
named n1..nN with their RAM and clocks, the links between them, the client
hub and the fault injector. Nothing happens until a scenario boots the hosts
and runs the environment.

Every input reaches a node through ``World.step``: the node handles it, the
step is traced, every observer (the safety checkers) looks at the node and
the effects, and only then are the effects carried out. Scheduling goes
through ``call_later``, a thin layer over simpy timeouts; simpy orders
same-time events by insertion, so a run is a pure function of its seed.

Invariants kept: every random draw comes from ``self.rngs`` (seeded by the
run); hosts are always visited in node-id order; an observer sees every step
before its effects take place.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import simpy
from simpy.events import NORMAL

from skulk.core.effects import Log, SessionChanged
from skulk.core.ids import InstanceId, ModelId, NodeId
from skulk.core.inputs import Input, SubmitCommand
from skulk.core.instances import RunnerStatus
from skulk.core.telemetry import NetworkInterface

from sim.cards import sim_cards
from sim.clients import ClientHub
from sim.faults import Faults
from sim.host import GIB, SimHost
from sim.network import Link, Network
from sim.options import SimOptions
from sim.rng import Rngs
from sim.runners import Group
from sim.trace import Tracer

if TYPE_CHECKING:
    from skulk.core.node import CoreNode

    from sim.runners import SimRunner

__all__ = ["World", "CoreFailure", "CoreAssertion", "Livelock"]

_LATENCY_MS = {
    "thunderbolt": "latency_ms_thunderbolt",
    "ethernet": "latency_ms_ethernet",
    "wifi": "latency_ms_wifi",
    "vpn": "latency_ms_vpn",
}


class _Call(simpy.Event):
    """A scheduled call: an already-successful event whose one callback runs ``fn(*args)``."""

    def __init__(self, env: simpy.Environment, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.env = env
        self.callbacks = [_run_call]
        self._value = None
        self._ok = True
        self.fn = fn
        self.args = args


def _run_call(event: Any) -> None:
    event.fn(*event.args)


class Livelock(Exception):
    """Simulated time stopped moving: too many steps at one instant (a busy loop)."""


# Steps allowed at one simulated instant before the run is declared livelocked.
_SAME_INSTANT_STEPS_MAX = 50_000
# A step count no run reaches: "no watchdog".
_NEVER = 1 << 62


class CoreFailure(Exception):
    """The core raised while handling an input: an assertion, or any other exception (a safety failure).

    Only an ``Exception`` is wrapped: a ``BaseException`` such as the harness's
    ``BudgetExceeded`` or ``KeyboardInterrupt`` passes through untouched.
    """

    def __init__(self, host: NodeId, inp: Input, error: BaseException) -> None:
        # simpy re-raises an exception that escaped a process (a runner's or a
        # client's feed) as ``type(exc)(*exc.args)``: the args rebuild it.
        super().__init__(host, inp, error)
        self.host = host
        self.inp = inp
        self.error = error

    def __str__(self) -> str:
        what = "assertion" if isinstance(self.error, AssertionError) else f"exception {type(self.error).__name__}"
        return f"core {what} on {self.host} handling {type(self.inp).__name__}: {self.error}"


CoreAssertion = CoreFailure  # the name before any exception (not only assertions) counted


class World:
    """Everything one simulated run consists of."""

    def __init__(self, opts: SimOptions, *, tracing: bool = True, observers: Iterable[Any] = ()) -> None:
        self.opts = opts.validate()
        self.env = simpy.Environment()
        self.rngs = Rngs(opts.seed)
        self.core_config = opts.core
        self.cards = sim_cards()
        self.host_ids: list[NodeId] = [NodeId(f"n{i + 1}") for i in range(opts.node_count)]
        self.tracer = Tracer() if tracing else None
        self.observers: list[Any] = list(observers)
        # Counters and the material for the timeline picture.
        self.steps = 0
        # The harness's budget guard, called every ``_watch_every`` steps (``watch``).
        self._watchdog: Callable[[World], None] | None = None
        self._watch_every = 0
        self._watch_at = _NEVER
        self._instant = -1.0
        self._instant_steps = 0
        self.runners_started = 0
        self.tokens_streamed = 0
        self.appends_per_s: Counter[int] = Counter()
        self.session_log: list[tuple[float, NodeId, str, bool]] = []
        self.phases: list[tuple[float, str]] = []
        self.logs: deque[tuple[float, NodeId, str, str]] = deque(maxlen=2_000)
        self.log_levels: Counter[str] = Counter()
        self.groups: dict[InstanceId, Group] = {}
        self.metrics: dict[str, Any] = {}
        self.hosts: dict[NodeId, SimHost] = {}
        self._build_hosts()
        self.network = Network(self, opts, self.rngs("net"))
        self._build_links()
        self.clients = ClientHub(self)
        self.faults = Faults(self)

    # --- construction ---------------------------------------------------------------

    def _build_hosts(self) -> None:
        opts = self.opts
        rng = self.rngs("hosts")
        n = opts.node_count
        wifi_count = round(opts.wifi_node_fraction * n)
        on_wifi = set(rng.sample(range(n), wifi_count)) if wifi_count else set()
        self._on_wifi = on_wifi
        tb_pairs = []
        for a in range(n):
            for b in range(a + 1, n):
                if rng.random() < opts.thunderbolt_pair_fraction:
                    tb_pairs.append((a, b))
        self._tb_pairs = tb_pairs
        has_tb = {i for pair in tb_pairs for i in pair}
        for i, nid in enumerate(self.host_ids):
            interfaces = []
            if i in on_wifi:
                interfaces.append(NetworkInterface(name="en0", ip_address=f"192.168.1.{10 + i}", kind="wifi"))
            else:
                interfaces.append(NetworkInterface(name="en0", ip_address=f"10.0.0.{10 + i}", kind="ethernet"))
            if i in has_tb:
                interfaces.append(NetworkInterface(name="bridge0", ip_address=f"169.254.0.{10 + i}", kind="thunderbolt"))
            if opts.vpn_pairs:
                interfaces.append(
                    NetworkInterface(
                        name=opts.vpn_interface_name,
                        ip_address=f"100.64.0.{10 + i}",
                        kind=opts.vpn_interface_kind,  # type: ignore[arg-type]
                    )
                )
            offset = rng.uniform(-opts.clock_offset_s_max, opts.clock_offset_s_max)
            rate = 1.0 + rng.uniform(-opts.clock_drift_ppm_max, opts.clock_drift_ppm_max) * 1e-6
            self.hosts[nid] = SimHost(
                self,
                i,
                nid,
                ram_total_bytes=opts.ram_total_gib[i] * GIB,
                clock_offset_s=offset,
                clock_rate=rate,
                interfaces=tuple(interfaces),
                rng=self.rngs(f"host:{nid}"),
            )

    def _build_links(self) -> None:
        opts = self.opts
        ids = self.host_ids
        tb = set(self._tb_pairs)
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                na, nb = ids[a], ids[b]
                ha, hb = self.hosts[na], self.hosts[nb]
                lan = "wifi" if (a in self._on_wifi or b in self._on_wifi) else "ethernet"
                self.network.add_link(
                    Link(lan, na, nb, ha.interfaces[0].ip_address, hb.interfaces[0].ip_address, getattr(opts, _LATENCY_MS[lan]))
                )
                if (a, b) in tb:
                    self.network.add_link(
                        Link("thunderbolt", na, nb, f"169.254.0.{10 + a}", f"169.254.0.{10 + b}", opts.latency_ms_thunderbolt)
                    )
                if opts.vpn_pairs:
                    self.network.add_link(
                        Link(
                            "vpn", na, nb, f"100.64.0.{10 + a}", f"100.64.0.{10 + b}", opts.latency_ms_vpn,
                            label=opts.vpn_interface_kind,
                        )
                    )

    # --- scheduling -------------------------------------------------------------------------

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` after ``delay`` simulated seconds (same-time calls keep their order).

        A bare simpy event scheduled directly: the hot path of the simulator
        (every message and timer), so it skips ``Timeout``'s bookkeeping.
        """
        assert delay >= 0.0, delay
        self.env.schedule(_Call(self.env, fn, args), NORMAL, delay)

    def watch(self, watchdog: Callable[[World], None] | None, every_steps: int) -> None:
        """Call ``watchdog(world)`` every ``every_steps`` steps (None: stop); it may raise to end the run."""
        assert watchdog is None or every_steps > 0, every_steps
        self._watchdog = watchdog
        self._watch_every = every_steps
        self._watch_at = _NEVER if watchdog is None else self.steps + every_steps

    def process(self, generator: Any) -> simpy.Process:
        return self.env.process(generator)

    @property
    def now(self) -> float:
        return self.env.now

    # --- the step ---------------------------------------------------------------------------------

    def step(self, host: SimHost, node: CoreNode, inp: Input) -> None:
        """Feed ``inp`` to ``node``, then whatever its effects raised on the same host, in order."""
        self._step_one(host, node, inp)
        pending = host.pending
        while pending and host.node is node and not host.paused:
            self._step_one(host, node, pending.pop(0))

    def _step_one(self, host: SimHost, node: CoreNode, inp: Input) -> None:
        """One step: the node handles ``inp``; trace it, let the observers check, carry out the effects."""
        host.busy = True
        try:
            try:
                effects = node.handle(host.now(), inp)
            except Exception as exc:
                raise CoreFailure(host.id, inp, exc) from exc
            self.steps += 1
            if self.steps >= self._watch_at:
                self._watch_at += self._watch_every
                watchdog = self._watchdog
                assert watchdog is not None, "a watch step without a watchdog"
                watchdog(self)
            t = self.env.now
            if t != self._instant:
                self._instant = t
                self._instant_steps = 0
            else:
                self._instant_steps += 1
                if self._instant_steps > _SAME_INSTANT_STEPS_MAX:
                    raise Livelock(
                        f"{_SAME_INSTANT_STEPS_MAX} steps at t={t!r} without time moving "
                        f"(last: {host.id} handling {type(inp).__name__})"
                    )
            if self.tracer is not None:
                self.tracer.step(t, host.id, inp)
            if type(inp) is SubmitCommand:
                self.clients.handled(host, inp.command.command_id, node.session)
            for observer in self.observers:
                observer.after_step(host.id, node, inp, effects)
            host.carry_out(effects)
        finally:
            host.busy = False

    def notify(self, event: str, *args: Any) -> None:
        """Tell every observer that has a handler for ``event``."""
        for observer in self.observers:
            handler = getattr(observer, event, None)
            if handler is not None:
                handler(*args)

    def trace_note(self, host: str, kind: str, text: str) -> None:
        if self.tracer is not None:
            self.tracer.note(self.env.now, host, kind, text)

    def phase(self, name: str) -> None:
        self.phases.append((self.env.now, name))
        self.trace_note("-", "phase", name)

    # --- callbacks from hosts, runners and clients ---------------------------------------------------

    def on_boot(self, host: SimHost) -> None:
        self.trace_note(host.id, "boot", f"incarnation {host.incarnation}")
        self.notify("node_booted", host.id)

    def on_crash(self, host: SimHost) -> None:
        self.trace_note(host.id, "crash", f"incarnation {host.incarnation}")
        self.clients.host_crashed(host)
        self.notify("node_crashed", host.id)
        self.session_log.append((self.env.now, host.id, "", False))

    def on_session_changed(self, host: SimHost, effect: SessionChanged) -> None:
        self.session_log.append((self.env.now, host.id, str(effect.session), effect.is_master))
        self.clients.on_session_changed(host, effect.session)

    def on_log(self, host: SimHost, effect: Log) -> None:
        self.log_levels[effect.level] += 1
        if effect.level != "debug":
            self.logs.append((self.env.now, host.id, effect.level, effect.message))

    def count_append(self) -> None:
        self.appends_per_s[int(self.env.now)] += 1

    def observe_runner_status(self, runner: SimRunner, status: RunnerStatus) -> None:
        spec = runner.spec
        self.notify("runner_reported", runner.host.id, spec.instance_id, spec.runner_id, status, spec.context_ceiling)

    def group(self, instance_id: InstanceId, world_size: int) -> Group:
        group = self.groups.get(instance_id)
        if group is None or group.world_size != world_size:
            group = Group(self.env, instance_id, world_size)
            self.groups[instance_id] = group
        return group

    # --- queries --------------------------------------------------------------------------------------

    def running_hosts(self) -> list[SimHost]:
        return [self.hosts[h] for h in self.host_ids if self.hosts[h].running]

    def live_hosts(self) -> list[SimHost]:
        """Hosts whose process exists (running or paused)."""
        return [self.hosts[h] for h in self.host_ids if self.hosts[h].node is not None]

    def masters(self) -> list[NodeId]:
        """Running hosts whose node currently acts as a master."""
        return [h.id for h in self.running_hosts() if h.node is not None and h.node.is_master]

    def boot_all(self) -> None:
        for nid in self.host_ids:
            host = self.hosts[nid]
            if host.node is None and not host.stopped_for_good:
                host.boot()
