"""A whole node process: the core, its driver and every piece of I/O around it.

Theory of operation
-------------------
``NodeRuntime.run()`` assembles, in order:

1. model cards (built-in, ``<data_dir>/cards``, local model directories) and
   the persisted node record (so a restart is the same node, never going back
   in time);
2. the disk event log, the runner supervisor, the driver and the API bridge;
3. the HTTP API (uvicorn on a socket bound here, so a busy port is a clear
   start-up error);
4. one telemetry measurement, the zenoh transport, then ``Boot`` (nothing is
   delivered to the core before ``Boot``: deliveries are loop callbacks and
   ``Boot`` is fed in the same loop step that finishes opening the transport);
5. background tasks: telemetry, link probes and local-model reports (which
   first generate the embedded default model if ``SKULK_AUTO_PLACE`` names it).

Auto-placement itself is the core's: a master places each model of
``CoreConfig.auto_place`` once per session when the state has none.

Shutdown (SIGINT/SIGTERM, or a fatal core error): stop the API, stop and reap
every runner (escalating), close the transport and the event log. The exit
code is 0 after a signal, 70 after a fatal error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import uvicorn

import skulk
from skulk.core.cards import CardError, ModelCard
from skulk.core.ids import NodeId
from skulk.core.inputs import Boot, InfoObserved, Input, ModelAvailable, PeersChanged, Received
from skulk.core.node import CoreNode
from skulk.core.telemetry import NetworkInterface, NodeIdentity
from skulk.runtime.config import RuntimeConfig
from skulk.runtime.driver import NODE_RECORD_FILENAME, Driver, load_node_record
from skulk.runtime.downloads import HubSettings
from skulk.runtime.eventlog import EventLog
from skulk.runtime.filestore import NodeFiles
from skulk.runtime.api_bridge import ApiBridge
from skulk.runtime.supervisor import Supervisor, find_local_models
from skulk.runtime.telemetry import LinkProber, Telemetry
from skulk.runtime.transfer import TransferAuth, TransferServer
from skulk.runtime.transport import Transport, TransportSettings

__all__ = ["NodeRuntime", "EXIT_FATAL", "load_node_cards"]

log = logging.getLogger("skulk.node")

EXIT_FATAL = 70
_MODEL_RESCAN_S = 60.0


def load_node_cards(config: RuntimeConfig) -> dict[str, ModelCard]:
    """Built-in cards, operator cards, then a card for each local model directory."""
    from skulk.cards import card_for_model_dir, load_cards

    def skip(path: Path, exc: CardError) -> None:
        log.error("ignoring model card %s: %s", path, exc)

    cards: dict[str, ModelCard] = dict(load_cards([config.data_dir / "cards"], on_error=skip))
    for model_id in find_local_models(config.models_dir):
        if model_id in cards:
            continue
        try:
            cards[model_id] = card_for_model_dir(config.models_dir / model_id, model_id=model_id)
        except CardError as exc:
            log.warning("local model %s has no usable card: %s", model_id, exc)
    return {k: cards[k] for k in sorted(cards)}


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the node owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class NodeRuntime:
    """One node. ``await run()`` until stopped; ``request_stop()`` from anywhere on the loop."""

    def __init__(self, config: RuntimeConfig, *, serve_api: bool = True) -> None:
        self.config = config
        self.serve_api = serve_api
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.driver: Driver | None = None
        self.api_bridge: ApiBridge | None = None
        self.transport: Transport | None = None
        self.supervisor: Supervisor | None = None
        self.eventlog: EventLog | None = None
        self.telemetry: Telemetry | None = None
        self.prober: LinkProber | None = None
        self.server: _Server | None = None
        self.files: NodeFiles | None = None
        self.transfer_server: TransferServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def request_stop(self, exit_code: int = 0) -> None:
        self.exit_code = max(self.exit_code, exit_code)
        self._stop.set()

    # --- assembly ----------------------------------------------------------------------

    async def run(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        log.info("node %s (%s) starting; data %s, models %s, namespace %s, cluster key from %s",
                 cfg.node_id, cfg.friendly_name, cfg.data_dir, cfg.models_dir, cfg.namespace, cfg.cluster_key_source)

        cards = await asyncio.to_thread(load_node_cards, cfg)
        record = load_node_record(cfg.data_dir / NODE_RECORD_FILENAME, cfg.node_id)
        core = CoreNode(NodeId(cfg.node_id), cfg.core, cards=cards, record=record)

        def feed(inp: object) -> None:
            assert self.driver is not None
            self.driver.feed(inp)  # type: ignore[arg-type]

        # A log that cannot be opened (a nearly full disk is common on laptops) comes back
        # degraded without calling on_failure; it is reported below, once the driver exists.
        self.eventlog = EventLog(
            cfg.data_dir / "eventlog",
            on_failure=self._log_failed,
            min_free_bytes=cfg.eventlog_min_free_bytes,
        )
        self.supervisor = Supervisor(
            feed=feed,
            models_dir=cfg.models_dir,
            work_dir=cfg.data_dir / "runners",
            env=cfg.runner_env(),
            stop_grace_s=cfg.runner_stop_grace_s,
        )
        incarnation = secrets.token_hex(6)
        self.transport = Transport(
            TransportSettings(
                node_id=cfg.node_id,
                namespace=cfg.namespace,
                secret=cfg.cluster_secret,
                listen=cfg.listen,
                connect=cfg.bootstrap_peers,
                multicast=cfg.multicast,
                lease_ms=cfg.lease_ms,
                api_port=cfg.api_port if self.serve_api else 0,
                incarnation=incarnation,
                replay_window_s=cfg.replay_window_s,
            ),
            on_message=lambda sender, msg: feed(Received(sender=sender, message=msg)),
            on_peers=lambda peers: feed(PeersChanged(peers=peers)),
        )
        # Model files: this node's disk, its transfers (hub and peers), and what it serves to peers.
        self._loop = loop
        transfer_auth = TransferAuth(cfg.cluster_secret, cfg.namespace)
        self.files = NodeFiles(
            cfg.models_dir,
            HubSettings(endpoint=cfg.hf_endpoint, token=cfg.hf_token, offline=cfg.hf_offline),
            transfer_auth,
            cfg.node_id,
            feed=self._feed_threadsafe,
            peer_url=self._peer_url,
            budget_bytes=cfg.models_disk_budget_bytes,
        )
        self.transfer_server = TransferServer(cfg.models_dir, transfer_auth)
        self.driver = Driver(
            core,
            transport=self.transport,
            supervisor=self.supervisor,
            eventlog=self.eventlog,
            record_path=cfg.data_dir / NODE_RECORD_FILENAME,
            fatal=lambda exc: self.request_stop(EXIT_FATAL),
            files=self.files,
        )
        self.api_bridge = ApiBridge(
            core=core,
            feed=feed,
            friendly_name=cfg.friendly_name,
            version=skulk.__version__,
            metrics=self.metrics,
            runner_diagnostics=self.supervisor.diagnostics,
            describe_model=self._describe_model,
        )
        self.driver.api = self.api_bridge
        if self.eventlog.degraded:
            self.driver.on_log_failure(self.eventlog.degraded_reason)

        try:
            if self.serve_api:
                await self._start_api()
            identity = NodeIdentity(friendly_name=cfg.friendly_name, version=skulk.__version__)
            self.telemetry = Telemetry(
                identity=identity, advertise=cfg.advertise, interval_s=cfg.core.telemetry_interval_s, feed=feed
            )
            await self.telemetry.measure_once()
            await self.transport.start()
            feed(Boot())  # same loop step as the end of transport.start(): nothing was delivered before it
            self.prober = LinkProber(
                node_id=cfg.node_id,
                targets=self._probe_targets,
                feed=feed,
                interval_s=cfg.probe_interval_s,
                timeout_s=cfg.probe_timeout_s,
            )
            self._spawn(self.telemetry.run(), "telemetry")
            self._spawn(self.prober.run(), "link-probes")
            self._spawn(self._models_loop(), "models")
            self._spawn(self._disk_loop(), "disk")
            log.info("node %s up: API on %s:%d", cfg.node_id, cfg.api_host, cfg.api_port)
            await self._stop.wait()
        finally:
            await self._shutdown()
        return self.exit_code

    def _feed_threadsafe(self, inp: Input) -> None:
        """Feed the core from any thread (transfers and scans run in threads)."""
        loop = self._loop
        if loop is None or loop.is_closed() or self.driver is None:
            return
        loop.call_soon_threadsafe(self.driver.feed, inp)

    def _peer_url(self, node: str, address: str) -> str | None:
        """The base URL of ``node``'s API at ``address`` (the link the core chose), if its port is known."""
        from skulk.core.interconnect import format_address

        info = self.transport.peer_info.get(node) if self.transport is not None else None
        if info is None or info.api_port <= 0:
            return None
        return "http://" + format_address(address, info.api_port)

    def _describe_model(self, model_id: str) -> ModelCard:
        """A card for a hub model (``POST /models/add``; blocking, the bridge runs it in a thread)."""
        from skulk.runtime.downloads import DownloadFailed, HubDownloader

        cfg = self.config
        settings = HubSettings(endpoint=cfg.hf_endpoint, token=cfg.hf_token, offline=cfg.hf_offline)
        try:
            card, _ = HubDownloader(settings).describe(model_id)
        except DownloadFailed as exc:
            raise LookupError(f"{exc.code}: {exc.message}") from exc
        return card

    def _log_failed(self, error: str) -> None:
        """The event log turned degraded mid-run (it never reports from its constructor)."""
        assert self.driver is not None, "the event log reported a failure before the driver was wired"
        self.driver.on_log_failure(error)

    def _spawn(self, coro: object, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s failed: %r", task.get_name(), exc, exc_info=exc)

    async def _start_api(self) -> None:
        from skulk.api.app import create_app
        from skulk.api.config import ApiConfig

        assert self.api_bridge is not None
        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.api_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.api_host, cfg.api_port))
        except OSError as exc:
            sock.close()
            raise SystemExit(f"cannot serve the API on {cfg.api_host}:{cfg.api_port}: {exc} (set SKULK_API_PORT)") from None
        sock.listen(1024)
        sock.setblocking(False)
        from skulk.api.keys import exposure_warning, load_api_keys

        try:
            keys = load_api_keys(cfg.api_keys, cfg.api_admin_keys, cfg.api_keys_file or None)
        except ValueError as exc:
            raise SystemExit(f"cannot start the API: {exc}") from None
        warning = exposure_warning(cfg.api_host, cfg.api_port, keys)
        if warning is not None:
            log.warning("%s", warning)
        api_config = ApiConfig(max_output_tokens=cfg.max_output_tokens, max_body_bytes=cfg.api_max_body_bytes, keys=keys)
        extra = self.transfer_server.routes() if self.transfer_server is not None else []
        app = create_app(self.api_bridge, config=api_config, extra_routes=extra)
        server = _Server(
            uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5)
        )
        self.server = server
        self._spawn(server.serve(sockets=[sock]), "api")
        for _ in range(200):
            if server.started:
                return
            await asyncio.sleep(0.01)

    # --- background work ----------------------------------------------------------------

    def _probe_targets(self) -> Mapping[str, tuple[int, tuple[NetworkInterface, ...]]]:
        assert self.transport is not None and self.api_bridge is not None
        state = self.api_bridge.state
        out: dict[str, tuple[int, tuple[NetworkInterface, ...]]] = {}
        for peer, info in self.transport.peer_info.items():
            net = state.node_network.get(NodeId(peer))
            if net is not None and info.api_port > 0:
                out[peer] = (info.api_port, net.interfaces)
        return out

    async def _models_loop(self) -> None:
        assert self.supervisor is not None and self.driver is not None
        cfg = self.config
        auto = cfg.auto_place
        if auto is not None:
            from skulk.engine.models import PRESETS, ensure_model

            if auto in PRESETS:
                try:
                    await asyncio.to_thread(ensure_model, auto, root=cfg.models_dir)
                except Exception as exc:
                    log.error("could not generate the default model %s: %s", auto, exc)
        while True:
            try:
                found = await asyncio.to_thread(self._scan_models)
                for model_id, card in found:
                    # A card only for a directory that appeared since start-up; the core
                    # adds it (placeable from then on) unless it knows the model already.
                    self.driver.feed(ModelAvailable(model_id=model_id, card=card))
                if self.files is not None:
                    await asyncio.to_thread(self.files.scan)
            except Exception:
                log.exception("scanning local models failed")
            await asyncio.sleep(_MODEL_RESCAN_S)

    async def _disk_loop(self) -> None:
        """The models disk (free, used by models, budget) in telemetry, every telemetry interval."""
        assert self.files is not None and self.driver is not None
        while True:
            try:
                disk = await asyncio.to_thread(self.files.disk_info)
                self.driver.feed(InfoObserved(disk=disk))
            except OSError as exc:
                log.warning("cannot measure the models disk: %s", exc)
            await asyncio.sleep(self.config.core.telemetry_interval_s)

    def _scan_models(self) -> list[tuple[str, ModelCard | None]]:
        """Local model directories with a card for each (blocking: runs in a thread)."""
        from skulk.cards import card_for_model_dir

        assert self.driver is not None
        known = self.driver.core.cards
        out: list[tuple[str, ModelCard | None]] = []
        for model_id in find_local_models(self.config.models_dir):
            card = None
            if model_id not in known:
                try:
                    card = card_for_model_dir(self.config.models_dir / model_id, model_id=model_id)
                except CardError as exc:
                    log.warning("local model %s has no usable card: %s", model_id, exc)
            out.append((model_id, card))
        return out

    # --- metrics ------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        t, d, s, e = self.transport, self.driver, self.supervisor, self.eventlog
        if t is not None:
            out["skulk_peers"] = float(len(t.members))
            out["skulk_transport_sent_total"] = float(sum(t.sent.values()))
            out["skulk_transport_received_total"] = float(sum(t.received.values()))
            for reason in ("bad_mac", "foreign_namespace", "malformed", "stale", "replayed", "wrong_topic", "misdirected",
                           "send_error"):
                out[f"skulk_transport_dropped_{reason}_total"] = float(t.drops.get(reason, 0))
        if d is not None:
            core = d.core
            # (is-master and the state's last index are the API's own metrics.)
            out["skulk_session_clock"] = float(core.session.clock if core.session else -1)
            out["skulk_core_inputs_total"] = float(sum(d.inputs.values()))
            out["skulk_core_effects_total"] = float(sum(d.effects.values()))
            out["skulk_core_handle_seconds_total"] = d.handle_seconds_total
            out["skulk_core_handle_seconds_max"] = d.handle_seconds_max
            out["skulk_persist_failures_total"] = float(d.persist_failures)
            if d.master_session_started_at is not None:
                out["skulk_master_session_started_unixtime"] = d.master_session_started_at
        if e is not None:
            out["skulk_eventlog_appended_total"] = float(e.appended)
            out["skulk_eventlog_dropped_total"] = float(e.dropped)
            out["skulk_eventlog_degraded"] = 1.0 if e.degraded else 0.0
        if s is not None:
            out["skulk_runners"] = float(len(s.runners))
            out["skulk_runner_exits_total"] = float(len(s.exits))
            out["skulk_runner_sigterm_total"] = float(s.escalations["sigterm"])
            out["skulk_runner_sigkill_total"] = float(s.escalations["sigkill"])
        if self.telemetry is not None:
            out["skulk_telemetry_failures_total"] = float(self.telemetry.failures)
        if self.prober is not None:
            out["skulk_link_probe_rounds_total"] = float(self.prober.rounds)
        out["skulk_uptime_seconds"] = time.time() - _STARTED_AT
        return out

    # --- shutdown -----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        log.info("node %s stopping", self.config.node_id)
        if self.server is not None:
            self.server.should_exit = True
        for task in self._tasks:
            if task.get_name() != "api":
                task.cancel()
        if self.files is not None:
            self.files.transfers.cancel_all()  # partial files stay: the next start resumes them
        if self.driver is not None:
            self.driver.stop_runners()  # through the core, so their exits are not taken for crashes
        if self.supervisor is not None:
            await self.supervisor.shutdown()
        if self.transport is not None:
            await self.transport.close()
        if self.driver is not None:
            self.driver.cancel_timers()
        if self.eventlog is not None:
            self.eventlog.close()
        api = [t for t in self._tasks if t.get_name() == "api"]
        if api:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.gather(*api, return_exceptions=True), timeout=6)
        log.info("node %s stopped", self.config.node_id)


_STARTED_AT = time.time()

