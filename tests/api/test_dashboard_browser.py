"""The dashboard in a real headless Chromium, against the API over the core-backed node double.

Checks what an operator relies on: the topology shows every node, the master
and links coloured by kind; the instance shows its placement, runner states
and the speculative-decoding badge; the placement panel previews live and
honours exclusions; the chat streams; deep links survive a refresh; the API
reference page renders offline. Screenshots land in artifacts/dashboard/.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from skulk.api.config import ApiConfig
from skulk.core.commands import SubmitTask
from skulk.core.events import NodeGatheredInfo
from skulk.core.instances import KvUse, SpeculationConfig
from skulk.core.tasks import GenerationStats, TokenChunk
from tests.api.browser import chromium_page, require_chromium, screenshot
from tests.api.conftest import ServedApp
from tests.api.node_double import ScriptedNode
from tests.api.test_streaming import final, tok

pytestmark = pytest.mark.browser


def slow_reply(cmd: SubmitTask) -> list[TokenChunk | float]:
    words = ["The", " fox", " crossed", " the", " frozen", " field", "."]
    out: list[TokenChunk | float] = []
    for i, w in enumerate(words):
        out += [tok(cmd, i, w), 0.15]
    stats = GenerationStats(prompt_tps=420.0, generation_tps=6.5, prompt_tokens=12, generation_tokens=len(words))
    out.append(final(cmd, len(words), stats=stats))
    return out


@pytest.fixture
def dashboard() -> Iterator[ServedApp]:
    require_chromium()
    node = ScriptedNode.three_nodes(script=slow_reply)
    node.place("skulk/tiny-qwen2", min_nodes=3, speculation=SpeculationConfig(drafter="draft_model", depth=4, draft_model_id="skulk/tiny-draft"))
    with ServedApp(node, ApiConfig(dashboard_poll_ms=300)) as served:
        yield served


def test_dashboard_shows_cluster_places_and_chats(dashboard: ServedApp) -> None:
    with chromium_page(dashboard.base_url) as page:
        page.goto("/")
        page.wait_for_selector("[data-testid=node-card]")
        cards = page.locator("[data-testid=node-card]")
        assert cards.count() == 3
        assert sorted(page.locator("[data-testid=node-card] .title").all_inner_texts()) == ["alpha", "bravo", "charlie"]
        master = page.locator("[data-testid=node-card]", has=page.locator("[data-testid=master-badge]"))
        assert master.count() == 1 and master.get_attribute("data-node") == "node-a"
        kinds = sorted(page.locator("[data-testid=link]").evaluate_all("els => els.map(e => e.dataset.kind + ':' + e.getAttribute('stroke'))"))
        assert kinds == ["ethernet:#3b82f6", "thunderbolt:#a855f7", "wifi:#f59e0b"]
        inst = page.locator("[data-testid=instance-card]")
        assert inst.count() == 1
        assert "skulk/tiny-qwen2" in inst.inner_text()
        assert page.locator("[data-testid=runner-status]").all_inner_texts() == ["Ready"] * 3
        assert "depth 4" in page.locator("[data-testid=spec-badge]").inner_text()
        screenshot(page, "overview")

        # Deep link + refresh: the instance page renders from its URL.
        iid = inst.get_attribute("data-instance")
        page.goto(f"/instances/{iid}")
        page.reload()
        page.wait_for_selector(f"[data-testid=instance-card][data-instance='{iid}']")
        assert "Tasks in flight" in page.inner_text("main")

        # Placement: live previews, and excluding two nodes leaves single-node rows hosted on the third.
        page.click("nav a[data-nav=place]")
        page.wait_for_selector("[data-testid=preview-row].feasible")
        assert page.locator("[data-testid=preview-row]").count() == 3
        page.locator("[data-testid=exclude-node][value=node-a]").check()
        page.locator("[data-testid=exclude-node][value=node-b]").check()
        page.wait_for_function("document.querySelectorAll('[data-testid=preview-row]').length === 1")
        assert "charlie" in page.locator("[data-testid=preview-row]").inner_text()
        screenshot(page, "place")
        page.click("[data-testid=place-button]")
        page.wait_for_selector("[data-testid=place-message] .ok")
        placed = page.locator("[data-testid=place-message]").inner_text()
        assert "placed skulk/tiny-qwen2" in placed

        # Chat: the reply streams in (several partial states) and finishes with "stop".
        page.goto("/chat")
        page.reload()
        page.wait_for_selector("[data-testid=chat-model] option[value='skulk/tiny-qwen2']", state="attached")
        page.fill("[data-testid=chat-input]", "Tell me about foxes")
        page.click("[data-testid=chat-send]")
        reply = page.locator("[data-testid=msg-assistant] .text").last
        page.wait_for_function("document.querySelector('[data-testid=msg-assistant] .text').textContent.length > 0")
        partial = reply.text_content()
        page.wait_for_selector("[data-testid=msg-assistant] .text[data-done='1']")
        full = reply.text_content()
        assert full == "The fox crossed the frozen field."
        assert partial and len(partial) < len(full), "the reply streamed in pieces"
        assert reply.get_attribute("data-finish") == "stop"
        assert "tok/s" in page.locator("[data-testid=chat-stats]").inner_text()
        screenshot(page, "chat")

        # The API reference renders offline.
        page.goto("/docs")
        page.wait_for_selector("details.op")
        assert page.locator("details.op").count() >= 14
        screenshot(page, "docs")

    (task,) = [c for c in dashboard.node.tasks_submitted()]
    assert task.params.messages is not None and task.params.messages[-1].content == "Tell me about foxes"
    assert task.params.max_tokens == 64


def test_chat_stop_abandons_the_request(dashboard: ServedApp) -> None:
    node = dashboard.node
    node.script = lambda cmd: [tok(cmd, 0, "Thinking"), 30.0, final(cmd, 1)]
    with chromium_page(dashboard.base_url) as page:
        page.goto("/chat")
        page.wait_for_selector("[data-testid=chat-model] option[value='skulk/tiny-qwen2']", state="attached")
        page.fill("[data-testid=chat-input]", "a long one")
        page.click("[data-testid=chat-send]")
        page.wait_for_function("document.querySelector('[data-testid=msg-assistant] .text').textContent === 'Thinking'")
        page.click("[data-testid=chat-stop]")
        page.wait_for_selector("[data-testid=msg-assistant] .text[data-finish='aborted']")
    cid = node.tasks_submitted()[0].command_id
    deadline = time.monotonic() + 5
    while node.abandoned != [cid]:
        assert time.monotonic() < deadline, f"abandon not called: {node.abandoned}"
        time.sleep(0.02)


def test_instance_cards_show_kv_use(dashboard: ServedApp) -> None:
    node = dashboard.node
    (inst,) = node.state.instances.values()
    rank0 = next(r for r, s in inst.shard_assignments.runner_to_shard.items() if s.device_rank == 0)
    host = next(n for n, r in inst.shard_assignments.node_to_runner.items() if r == rank0)
    kv = KvUse(budget_positions=8447, rows_positions=2110, cache_positions=1500, cache_entries=3, bytes_per_position=1024,
               prefix_hits=9, prefix_misses=3, positions_reused=12000, refused=2)  # fmt: skip
    node._apply(NodeGatheredInfo(node_id=host, runner_kv={rank0: kv}))
    with chromium_page(dashboard.base_url) as page:
        page.goto("/")
        page.wait_for_selector("[data-testid=kv-use]")
        text = page.locator("[data-testid=kv-use]").inner_text()
        assert "KV 2,110 running + 1,500 cached of 8,447 positions" in text
        assert "3 entries" in text and "9 hits of 12" in text and "12,000 tokens reused" in text and "2 refused (503)" in text
        widths = page.locator("[data-testid=kv-use] .fill").evaluate_all("els => els.map(e => e.style.width)")
        assert [round(float(w.rstrip("%"))) for w in widths] == [round(100 * 2110 / 8447), round(100 * 1500 / 8447)]
        screenshot(page, "kv-use")


def test_chat_shows_reasoning_collapsed_and_tool_calls_as_tool_calls(dashboard: ServedApp) -> None:
    from skulk.core.tasks import ToolCallDelta

    node = dashboard.node
    call = ToolCallDelta(index=0, id="call_abc123", name="get_weather", arguments='{"location": "Paris", "units": "celsius"}')
    node.script = lambda cmd: [
        tok(cmd, 0, "", reasoning="The user wants the weather; "), 0.05,
        tok(cmd, 1, "", reasoning="call the tool."), 0.05,
        tok(cmd, 2, "", tool_calls=(call,)),
        final(cmd, 3, "tool_calls"),
    ]
    with chromium_page(dashboard.base_url) as page:
        page.goto("/chat")
        page.wait_for_selector("[data-testid=chat-model] option[value='skulk/tiny-qwen2']", state="attached")
        page.click(".tools-panel summary")
        page.fill("[data-testid=chat-tools]", '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]')
        page.select_option("[data-testid=chat-tool-choice]", "required")
        page.fill("[data-testid=chat-input]", "Weather in Paris?")
        page.click("[data-testid=chat-send]")
        page.wait_for_selector("[data-testid=msg-assistant] .text[data-finish='tool_calls']", state="attached")
        box = page.locator("[data-testid=chat-reasoning]")
        assert box.count() == 1 and box.get_attribute("open") is None, "reasoning is shown collapsed"
        assert page.locator("[data-testid=chat-reasoning-text]").text_content() == "The user wants the weather; call the tool."
        card = page.locator("[data-testid=chat-tool-call]")
        assert card.count() == 1 and card.get_attribute("data-name") == "get_weather"
        assert '"location": "Paris"' in card.inner_text() and "call_abc123" in card.inner_text()
        assert page.locator("[data-testid=msg-assistant] .text").inner_text() == ""
        page.click("[data-testid=chat-reasoning] summary")
        assert box.get_attribute("open") is not None
        screenshot(page, "chat-tools-reasoning")
    (task,) = node.tasks_submitted()
    assert [t.name for t in task.params.tools] == ["get_weather"] and task.params.tool_choice.mode == "required"


def test_dashboard_asks_for_the_api_key_once_and_keeps_it() -> None:
    from skulk.api.keys import ApiKeys

    require_chromium()
    key = "sk-dashboard-test-key-000000000"
    node = ScriptedNode.three_nodes(script=slow_reply)
    node.place("skulk/tiny-qwen2")
    unauthorized = ("401 (Unauthorized)",)  # the browser logs the first, keyless answers itself
    with ServedApp(node, ApiConfig(dashboard_poll_ms=300, keys=ApiKeys.of([key]))) as served, \
            chromium_page(served.base_url, expected_errors=unauthorized) as page:
        page.goto("/")
        page.wait_for_selector("[data-testid=api-key-form]")
        assert page.locator("[data-testid=node-card]").count() == 0, "no data without the key"
        page.fill("[data-testid=api-key-input]", key)
        page.click("[data-testid=api-key-save]")
        page.wait_for_selector("[data-testid=node-card]")
        assert page.locator("[data-testid=api-key-form]").count() == 0
        screenshot(page, "api-key-accepted")
        page.reload()
        page.wait_for_selector("[data-testid=node-card]")
        assert page.locator("[data-testid=api-key-form]").count() == 0, "the key is kept in the browser"
        assert page.evaluate("localStorage.getItem('skulk.apiKey')") == key


def test_dashboard_shows_model_copies_with_progress_disks_and_what_a_placement_would_fetch() -> None:
    """Issue 14: per-node disks, each copy's status with a progress bar (bytes, rate, ETA), errors; previews' transfers."""
    from skulk.core.events import ModelCopyUpdated
    from skulk.core.files import Coverage, ModelCopy
    from skulk.core.ids import ModelId, NodeId

    require_chromium()
    node = ScriptedNode.three_nodes()
    tiny = ModelId("skulk/tiny-qwen2")
    whole = Coverage(n_layers=6, layers=((0, 6),), head=True)
    node._apply(ModelCopyUpdated(node_id=NodeId("node-a"), model_id=tiny,
                                 copy=ModelCopy(status="verified", coverage=whole, bytes=4_000_000, source="hub")))
    node._apply(ModelCopyUpdated(node_id=NodeId("node-b"), model_id=tiny, copy=ModelCopy(
        status="downloading", coverage=Coverage(n_layers=6), source="peer:node-a", done_bytes=1_500_000,
        total_bytes=3_000_000, rate_bps=500_000, eta_s=3)))
    node._apply(ModelCopyUpdated(node_id=NodeId("node-c"), model_id=tiny, copy=ModelCopy(
        status="failed", coverage=Coverage(n_layers=6), source="hub",
        error="disk_full: skulk/tiny-qwen2: needs 4.1 MB of disk, has 1.0 MB free")))
    with ServedApp(node, ApiConfig(dashboard_poll_ms=300)) as served, chromium_page(served.base_url) as page:
        page.goto("/")
        page.wait_for_selector("[data-testid=model-copy]")
        text = page.locator("[data-testid=model-files]").inner_text()
        assert page.locator("[data-testid=model-copy]").count() == 3
        assert "2 MB of 3 MB" in text, text  # the dashboard's bytes(): MB without decimals below 1 GB
        assert "ETA 3 s" in text and "from peer:node-a" in text and "downloading" in text
        assert "whole model" in text and "disk_full: skulk/tiny-qwen2: needs 4.1 MB of disk" in text
        width = page.locator("[data-testid=model-copy] .bar .fill").first.get_attribute("style")
        assert width is not None and "width:50.0%" in width
        assert page.locator("[data-testid=node-disk]").count() == 3
        assert "free of" in page.locator("[data-testid=node-disk]").first.inner_text()
        screenshot(page, "model-files")
        # The placement preview says what each node would fetch (node-a holds the files).
        page.click("nav a[data-nav=place]")
        page.wait_for_selector("[data-testid=preview-row].feasible")
        cells = page.locator("[data-testid=preview-transfer]").all_inner_texts()
        assert any("none: the files are there" in c for c in cells), cells
        assert any("bravo" in c or "charlie" in c for c in cells), cells
