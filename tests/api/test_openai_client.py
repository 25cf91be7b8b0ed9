"""The official ``openai`` client works unchanged against the API (served by uvicorn on a socket)."""

from __future__ import annotations

import openai
import pytest

from skulk.core.commands import SubmitTask
from skulk.core.tasks import ChunkError, TokenChunk
from tests.api.conftest import ServedApp
from tests.api.test_streaming import final, tok

MODEL = "skulk/tiny-qwen2"


def client_for(served: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=10.0)


def test_chat_streamed_and_not(served: ServedApp) -> None:
    oa = client_for(served)
    reply = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16, seed=1)
    assert reply.choices[0].message.content == "Hello, world!"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens == 11
    stream = oa.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
    )
    parts = []
    usage = None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == "Hello, world!"
    assert usage is not None and usage.completion_tokens == 4


def test_models_and_completions(served: ServedApp) -> None:
    oa = client_for(served)
    models = oa.models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == MODEL, "the placed model is listed first"
    assert set(ids) == {MODEL, "big/huge-405b"}
    assert oa.models.retrieve(MODEL).id == MODEL
    text = oa.completions.create(model=MODEL, prompt="Once", max_tokens=4)
    assert text.choices[0].text == "Hello, world!"


def test_errors_map_to_the_client_exceptions(served: ServedApp) -> None:
    oa = client_for(served)
    with pytest.raises(openai.BadRequestError) as bad:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    assert bad.value.code == "context_length_exceeded"
    assert str(bad.value.message).startswith("Error code: 400")
    with pytest.raises(openai.NotFoundError) as missing:
        oa.chat.completions.create(model="nobody/nothing", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"


def test_in_band_error_raises_in_the_client(served: ServedApp) -> None:
    def failover(cmd: SubmitTask) -> list[TokenChunk | float]:
        return [tok(cmd, 0, "Hi"), final(cmd, 1, "error", error=ChunkError(message="master changed; retry", code="session_changed"))]

    served.node.script = failover
    oa = client_for(served)
    got = []
    with pytest.raises(openai.APIError) as err:
        for chunk in oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True):
            if chunk.choices:
                got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "Hi"
    assert "retry" in err.value.message
