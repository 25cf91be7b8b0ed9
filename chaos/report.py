"""Artifacts of a run: the trace (JSON lines), the timeline picture (SVG) and a summary.

The timeline has one lane per node showing when it acted as master (and in
which session) and when it was down, a band per fault, and a bar chart of
events indexed per second, so a person can see at a glance who led when and
what was going on. It is plain SVG written by hand: any browser opens it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sim.options import SimOptions, render

if TYPE_CHECKING:
    from chaos.harness import RunResult
    from sim.world import World

__all__ = ["write_artifacts", "timeline_svg"]

_COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d")


def write_artifacts(world: World, result: RunResult, opts: SimOptions, root: Path) -> list[str]:
    """Write the trace, timeline and summary for ``result`` under ``root``; returns the paths."""
    folder = root / f"{result.scenario}-seed{result.seed}{'-canary' if result.canary else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    header = {
        "scenario": result.scenario,
        "seed": result.seed,
        "canary": result.canary,
        "overrides": result.overrides,
        "status": result.status,
        "message": result.message,
        "digest": result.digest,
        "replay": result.replay,
    }
    if world.tracer is not None:
        trace = folder / "trace.jsonl"
        world.tracer.write_jsonl(trace, header)
        paths.append(str(trace))
    svg = folder / "timeline.svg"
    svg.write_text(timeline_svg(world, title=f"{result.scenario} seed {result.seed}: {result.status}"), encoding="utf-8")
    paths.append(str(svg))
    summary = folder / "summary.txt"
    lines = [result.line(), "", f"replay: {result.replay}", "", "metrics:"]
    lines += [f"  {k} = {v}" for k, v in sorted(result.metrics.items())]
    lines += ["", "checks:"] + [f"  {k} = {v}" for k, v in sorted(result.checks.items())]
    lines += ["", "faults:"] + [
        f"  {f.started_at:9.3f} .. {'' if f.ended_at is None else f'{f.ended_at:9.3f}'}  {f.describe()}"
        for f in world.faults.history
    ]
    lines += ["", "last log lines:"] + [f"  {t:9.3f} {h} {lvl}: {msg}" for t, h, lvl, msg in list(world.logs)[-60:]]
    lines += ["", "options:", render(opts)]
    summary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths.append(str(summary))
    (folder / "result.json").write_text(json.dumps(_jsonable(result.__dict__), indent=2, sort_keys=True), encoding="utf-8")
    paths.append(str(folder / "result.json"))
    return paths


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _master_spans(world: World, end: float) -> dict[str, list[tuple[float, float, str]]]:
    """Per host, the intervals it acted as master, with the session."""
    spans: dict[str, list[tuple[float, float, str]]] = {h: [] for h in world.host_ids}
    open_: dict[str, tuple[float, str]] = {}
    for t, host, session, is_master in world.session_log:
        if host in open_:
            start, sess = open_.pop(host)
            spans[host].append((start, t, sess))
        if is_master:
            open_[host] = (t, session)
    for host, (start, sess) in open_.items():
        spans[host].append((start, end, sess))
    return spans


def _down_spans(world: World, end: float) -> dict[str, list[tuple[float, float, str]]]:
    spans: dict[str, list[tuple[float, float, str]]] = {h: [] for h in world.host_ids}
    for fault in world.faults.history:
        if fault.kind in ("crash_stop", "crash_restart", "pause"):
            host = fault.target
            if host in spans:
                stop = fault.ended_at if fault.ended_at is not None and fault.kind != "crash_stop" else end
                spans[host].append((fault.started_at, stop, fault.kind))
    return spans


def _pack(faults: list[Any], end: float, rows_max: int) -> list[tuple[Any, int]]:
    """Assign each fault a row so bars in one row do not overlap (greedy, by start)."""
    row_end: list[float] = []
    out = []
    span = max(end, 1.0) * 0.12  # room for the label after a bar
    for fault in sorted(faults, key=lambda f: (f.started_at, f.describe())):
        stop = fault.ended_at if fault.ended_at is not None else end
        for row, last in enumerate(row_end):
            if last <= fault.started_at:
                row_end[row] = stop + span
                out.append((fault, row))
                break
        else:
            if len(row_end) < rows_max:
                row_end.append(stop + span)
                out.append((fault, len(row_end) - 1))
            else:
                out.append((fault, rows_max - 1))
    return out


def timeline_svg(world: World, *, title: str) -> str:
    """The run as an SVG picture (see the module docstring)."""
    end = max(world.env.now, 1.0)
    width, left, right = 1200, 110, 20
    plot = width - left - right
    lane_h, gap = 22, 6
    hosts = world.host_ids
    packed = _pack(list(world.faults.history), end, rows_max=16)
    fault_rows = max(1, 1 + max((row for _, row in packed), default=0))
    bars_h = 80
    top = 44
    height = top + len(hosts) * (lane_h + gap) + 24 + fault_rows * 14 + 30 + bars_h + 50

    def x(t: float) -> float:
        return left + plot * max(0.0, min(t, end)) / end

    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="16" font-size="14" font-weight="bold">{html.escape(title)}</text>',
        f'<text x="{width - right}" y="16" font-size="10" text-anchor="end">lanes: master (colour = session), '
        f'down (black), paused (grey)</text>',
    ]
    for i, (t, name) in enumerate(world.phases):
        anchor = "end" if x(t) > width - 90 else "start"
        out.append(
            f'<text x="{x(t) + 2:.1f}" y="{30 + 10 * (i % 2)}" font-size="9" fill="#555" text-anchor="{anchor}">'
            f"{html.escape(name)}</text>"
        )
    y = top
    lanes_top = y
    sessions: dict[str, str] = {}
    masters = _master_spans(world, end)
    downs = _down_spans(world, end)
    for host in hosts:
        out.append(f'<text x="8" y="{y + 15}">{html.escape(host)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{plot}" height="{lane_h}" fill="#f3f3f3"/>')
        for start, stop, kind in downs[host]:
            colour = "#bbbbbb" if kind == "pause" else "#333333"
            out.append(
                f'<rect x="{x(start):.1f}" y="{y}" width="{max(1.0, x(stop) - x(start)):.1f}" height="{lane_h}" fill="{colour}">'
                f"<title>{html.escape(kind)} {start:.2f}-{stop:.2f}s</title></rect>"
            )
        for start, stop, sess in masters[host]:
            colour = sessions.setdefault(sess, _COLOURS[len(sessions) % len(_COLOURS)])
            out.append(
                f'<rect x="{x(start):.1f}" y="{y + 4}" width="{max(1.0, x(stop) - x(start)):.1f}" height="{lane_h - 8}" '
                f'fill="{colour}"><title>master of {html.escape(sess)} {start:.2f}-{stop:.2f}s</title></rect>'
            )
        y += lane_h + gap
    out.append(f'<text x="8" y="{y + 12}" font-weight="bold">faults</text>')
    y += 18
    for fault, row in packed:
        stop = fault.ended_at if fault.ended_at is not None else end
        yy = y + row * 14
        label = html.escape(fault.describe())
        out.append(
            f'<rect x="{x(fault.started_at):.1f}" y="{yy}" width="{max(2.0, x(stop) - x(fault.started_at)):.1f}" height="10" '
            f'fill="#e45756" opacity="0.6"><title>{label} {fault.started_at:.2f}-{stop:.2f}s</title></rect>'
        )
        out.append(f'<text x="{max(x(fault.started_at), x(stop)) + 3:.1f}" y="{yy + 9}" font-size="8">{label}</text>')
    y += fault_rows * 14 + 16
    out.append(f'<text x="8" y="{y + 12}" font-weight="bold">events/s</text>')
    counts = world.appends_per_s
    peak = max(counts.values()) if counts else 1
    base = y + bars_h
    for second, count in sorted(counts.items()):
        h = bars_h * count / peak
        out.append(
            f'<rect x="{x(second):.1f}" y="{base - h:.1f}" width="{max(1.0, plot / end):.1f}" height="{h:.1f}" fill="#4c78a8">'
            f"<title>t={second}s: {count} events indexed</title></rect>"
        )
    out.append(f'<text x="{left - 4}" y="{y + 10}" text-anchor="end">{peak}</text>')
    for t, _name in world.phases:
        out.append(f'<line x1="{x(t):.1f}" y1="{lanes_top - 4}" x2="{x(t):.1f}" y2="{base}" stroke="#888" stroke-dasharray="3,3"/>')
    y = base + 4
    for tick in _ticks(end):
        out.append(f'<text x="{x(tick):.1f}" y="{y + 12}" text-anchor="middle" font-size="9">{tick:g}s</text>')
    legend_x = left
    for sess, colour in list(sessions.items())[:8]:
        out.append(f'<rect x="{legend_x}" y="{y + 22}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{legend_x + 13}" y="{y + 31}" font-size="9">master {html.escape(sess)}</text>')
        legend_x += 130
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _ticks(end: float) -> Iterable[float]:
    step = 10 ** max(0, len(str(int(end))) - 1)
    if end / step < 4:
        step /= 2
    t = 0.0
    while t <= end:
        yield t
        t += step
