"""Ollama: ``/api/chat``, ``/api/generate`` (NDJSON streams, or ``stream: false``), ``/api/tags``,
``/api/show``, ``/api/version``.

Translation (onto ``skulk.api.agent.ChatSpec``): ``messages`` with
``tool_calls`` (arguments as objects) and ``tool`` turns; ``tools`` in
OpenAI's function shape; ``format`` ``"json"`` or a JSON Schema is the
response format; ``think`` is ``enable_thinking`` (``true``/``false``) or a
``reasoning_effort`` (``"low"``, ``"medium"``, ``"high"``); ``options`` map
onto sampling (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``,
``num_predict``, ``stop``, ``repeat_penalty``). ``/api/generate`` is a chat
of ``system`` and ``prompt`` (or, with ``raw: true``, a plain completion).

Accepted and ignored, with the reason: ``keep_alive`` (Skulk's runners stay
loaded while placed), ``options.num_ctx`` (the instance's context ceiling
rules), ``options.num_thread``/``num_gpu`` (placement decides). Refused by
name: ``images``, ``suffix``, ``template``, ``context``, other ``options``.
Errors are Ollama's ``{"error": "..."}`` with the HTTP status.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response

from skulk.api.agent import ChatSpec, check_schema, history_call, prepare_spec, tool_spec
from skulk.api.body import decode_body, read_body
from skulk.api.appstate import app_state
from skulk.api.dialects import with_errors
from skulk.api.errors import ApiError
from skulk.api.generation import Prepared, check_model
from skulk.api.openai_routes import model_objects, run_generation
from skulk.api.wire import json_response
from skulk.core.commands import SubmitTask
from skulk.core.ids import ModelId
from skulk.core.tasks import ChatMessage, GenerationParams, ResponseFormat, TokenChunk, ToolChoice

__all__ = ["chat", "generate", "tags", "show", "version", "OLLAMA_VERSION", "error_response"]

# The Ollama API version Skulk's endpoints follow (clients gate features on it).
OLLAMA_VERSION = "0.12.0"
_ENCODER = msgspec.json.Encoder()
_NDJSON = "application/x-ndjson"


class OllamaError(msgspec.Struct, frozen=True, kw_only=True):
    """Ollama's error shape: ``{"error": "..."}``."""

    error: str


def error_response(exc: ApiError) -> Response:
    return Response(_ENCODER.encode({"error": exc.message}), status_code=exc.status, media_type="application/json", headers=exc.headers)


class _Req(msgspec.Struct, frozen=True, kw_only=True):
    pass


class OllamaOptions(_Req, frozen=True, kw_only=True):
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: list[Annotated[str, Meta(min_length=1)]] | None = None
    repeat_penalty: Annotated[float, Meta(gt=0.0)] | None = None
    num_ctx: int | None = None
    num_thread: int | None = None
    num_gpu: int | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    mirostat: int | None = None
    typical_p: float | None = None
    num_keep: int | None = None
    tfs_z: float | None = None


class OllamaFunctionDef(_Req, frozen=True, kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_.:-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OllamaToolDef(_Req, frozen=True, kw_only=True):
    type: Literal["function"] = "function"
    function: OllamaFunctionDef


class OllamaCallFunction(_Req, frozen=True, kw_only=True):
    name: str
    arguments: dict[str, Any] | str = {}


class OllamaCallIn(_Req, frozen=True, kw_only=True):
    id: str | None = None
    function: OllamaCallFunction


class OllamaMessageIn(_Req, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    tool_calls: list[OllamaCallIn] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    images: list[str] | None = None


Think = bool | Literal["low", "medium", "high"]


class OllamaChatRequest(_Req, frozen=True, kw_only=True):
    model: str
    messages: Annotated[list[OllamaMessageIn], Meta(min_length=1, max_length=4096)]
    tools: Annotated[list[OllamaToolDef], Meta(max_length=128)] | None = None
    format: Literal["json", ""] | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    stream: bool = True
    think: Think | None = None
    keep_alive: str | int | float | None = None


class OllamaGenerateRequest(_Req, frozen=True, kw_only=True):
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    format: Literal["json", ""] | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    stream: bool = True
    think: Think | None = None
    keep_alive: str | int | float | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None


class OllamaShowRequest(_Req, frozen=True, kw_only=True):
    model: str | None = None
    name: str | None = None


_IGNORED_OPTIONS = ("num_ctx", "num_thread", "num_gpu")


def _options(options: OllamaOptions | None) -> dict[str, Any]:
    o = options or OllamaOptions()
    for name in ("repeat_last_n", "presence_penalty", "frequency_penalty", "mirostat", "typical_p", "num_keep", "tfs_z"):
        if getattr(o, name) is not None:
            raise ApiError(400, f"options.{name} is not supported by Skulk", code="unsupported_value", param=f"options.{name}")
    if o.num_predict is not None and o.num_predict == 0:
        raise ApiError(400, "options.num_predict must not be 0", code="invalid_value", param="options.num_predict")
    return {
        "temperature": o.temperature,
        "top_p": o.top_p,
        "top_k": o.top_k,
        "min_p": o.min_p,
        "seed": o.seed,
        # Ollama: -1 (or -2) means "no limit": as many as fit.
        "max_tokens": o.num_predict if o.num_predict is not None and o.num_predict > 0 else None,
        "max_param": "options.num_predict",
        "stop": tuple(o.stop or ()),
        "repetition_penalty": o.repeat_penalty,
    }


def _format(value: str | dict[str, Any] | None) -> ResponseFormat:
    if value in (None, ""):
        return ResponseFormat()
    if value == "json":
        return ResponseFormat(type="json_object")
    assert isinstance(value, dict)
    return ResponseFormat(type="json_schema", schema=check_schema(value, "format"))


def _think(think: Think | None) -> tuple[bool | None, str | None]:
    if think is None or isinstance(think, bool):
        return think, None
    return True, think


def _chat_messages(body: OllamaChatRequest) -> tuple[ChatMessage, ...]:
    out = []
    for i, m in enumerate(body.messages):
        if m.images:
            raise ApiError(400, f"messages[{i}].images: image input is not supported by Skulk", code="unsupported_value", param=f"messages[{i}].images")
        calls = tuple(
            history_call(c.id or f"call_{i}_{j}", c.function.name, c.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")
            for j, c in enumerate(m.tool_calls or ())
        )
        if m.role == "tool":
            out.append(ChatMessage(role="tool", content=m.content, name=m.tool_name, tool_call_id=m.tool_call_id or m.tool_name or "call"))
        else:
            out.append(ChatMessage(role=m.role, content=m.content, tool_calls=calls, reasoning=m.thinking))
    return tuple(out)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class OllamaRenderer:
    """Runner chunks as Ollama NDJSON lines (``/api/chat`` or ``/api/generate``), or one object."""

    prepared: Prepared
    generate: bool
    started: float = field(default_factory=time.monotonic)
    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)

    def _line(self, payload: dict[str, Any]) -> bytes:
        return _ENCODER.encode(payload) + b"\n"

    def _piece(self, text: str, thinking: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.prepared.model, "created_at": _now()}
        if self.generate:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            out["message"] = message
        return out

    def _done(self, piece: dict[str, Any], finish: str, chunk: TokenChunk | None) -> dict[str, Any]:
        elapsed_ns = int((time.monotonic() - self.started) * 1e9)
        usage = chunk.usage if chunk is not None else None
        stats = chunk.stats if chunk is not None else None
        prompt_n = usage.prompt_tokens if usage else 0
        gen_n = usage.completion_tokens if usage else 0
        piece.update(
            done=True,
            done_reason="length" if finish == "length" else "stop",
            total_duration=elapsed_ns,
            load_duration=0,
            prompt_eval_count=prompt_n,
            prompt_eval_duration=int(prompt_n / stats.prompt_tps * 1e9) if stats and stats.prompt_tps > 0 else 0,
            eval_count=gen_n,
            eval_duration=int(gen_n / stats.generation_tps * 1e9) if stats and stats.generation_tps > 0 else 0,
        )
        return piece

    @staticmethod
    def _calls(chunk: TokenChunk) -> list[dict[str, Any]]:
        return [{"id": c.id, "function": {"index": c.index, "name": c.name, "arguments": json.loads(c.arguments or "{}")}} for c in chunk.tool_calls]

    def opening(self) -> list[bytes]:
        return []

    def render(self, chunk: TokenChunk) -> list[bytes]:
        if chunk.error is not None:
            return [self._line({"error": chunk.error.message})]
        piece = self._piece(chunk.text, chunk.reasoning, self._calls(chunk))
        if chunk.finish_reason is None:
            if not (chunk.text or chunk.reasoning or chunk.tool_calls):
                return []
            piece["done"] = False
            return [self._line(piece)]
        return [self._line(self._done(piece, chunk.finish_reason, chunk))]

    def cancelled(self) -> list[bytes]:
        return [self._line(self._done(self._piece("", "", []), "stop", None))]

    def lost(self) -> list[bytes]:
        return [self._line({"error": "the node lost this request's stream; retry the request"})]

    def closing(self) -> list[bytes]:
        return []

    def accumulate(self, chunk: TokenChunk) -> None:
        self.text.append(chunk.text)
        self.thinking.append(chunk.reasoning)
        self.calls.extend(self._calls(chunk))

    def final(self, last: TokenChunk | None, finish: str) -> dict[str, Any]:
        return self._done(self._piece("".join(self.text), "".join(self.thinking), self.calls), finish, last)


@with_errors(error_response)
async def chat(request: Request) -> Response:
    """``POST /api/chat``."""
    context = app_state(request)
    body = decode_body(await read_body(request, context.config.max_body_bytes), OllamaChatRequest)
    thinking, effort = _think(body.think)
    tools = tuple(tool_spec(t.function.name, t.function.description, t.function.parameters, f"tools[{i}].function.parameters")
                  for i, t in enumerate(body.tools or ()))
    spec = ChatSpec(model=body.model, messages=_chat_messages(body), stream=body.stream, tools=tools, tool_choice=ToolChoice(mode="auto"),
                    response_format=_format(body.format), response_format_param="format", enable_thinking=thinking,
                    reasoning_effort=effort, **_options(body.options))
    prepared = prepare_spec(context.node, spec, context.config.max_output_tokens)
    return await run_generation(request, context, prepared, OllamaRenderer(prepared, generate=False), media_type=_NDJSON)


@with_errors(error_response)
async def generate(request: Request) -> Response:
    """``POST /api/generate``."""
    context = app_state(request)
    body = decode_body(await read_body(request, context.config.max_body_bytes), OllamaGenerateRequest)
    for name in ("suffix", "template", "context", "images"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported by Skulk", code="unsupported_value", param=name)
    if not body.prompt:
        # Ollama loads the model and answers done on an empty prompt; placed models are always loaded.
        check_model(context.node, body.model)
        return json_response({"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"})
    opts = _options(body.options)
    thinking, effort = _think(body.think)
    if body.raw:
        fmt = _format(body.format)
        if fmt.type != "text":
            raise ApiError(400, "format needs the chat template; it cannot be used with raw", code="invalid_value", param="format")
        prepared = _raw_completion(context, body, opts)
    else:
        messages = ((ChatMessage(role="system", content=body.system),) if body.system else ()) + (ChatMessage(role="user", content=body.prompt),)
        spec = ChatSpec(model=body.model, messages=messages, stream=body.stream, response_format=_format(body.format),
                        response_format_param="format", enable_thinking=thinking, reasoning_effort=effort, **opts)
        prepared = prepare_spec(context.node, spec, context.config.max_output_tokens)
    return await run_generation(request, context, prepared, OllamaRenderer(prepared, generate=True), media_type=_NDJSON)


def _raw_completion(context: Any, body: OllamaGenerateRequest, opts: dict[str, Any]) -> Prepared:
    from skulk.api.generation import admit_request

    instances = check_model(context.node, body.model)
    admit_request(instances, opts["max_tokens"], "options.num_predict", context.config.max_output_tokens)
    params = GenerationParams(
        prompt=body.prompt, max_tokens=opts["max_tokens"], temperature=opts["temperature"],
        top_p=1.0 if opts["top_p"] is None else opts["top_p"], top_k=opts["top_k"] or 0, min_p=opts["min_p"] or 0.0,
        seed=opts["seed"], stop=opts["stop"], repetition_penalty=opts["repetition_penalty"],
    )
    command = SubmitTask(command_id=context.node.new_command_id(), model_id=ModelId(body.model), kind="completion", params=params)
    return Prepared(command=command, model=body.model, kind="completion", stream=body.stream, include_usage=False, want_logprobs=False)


def _details(context: Any, model: str) -> dict[str, Any]:
    card = context.node.cards.get(model)
    return {
        "parent_model": "",
        "format": "mlx",
        "family": card.family if card else "",
        "families": [card.family] if card else [],
        "parameter_size": "",
        "quantization_level": "",
    }


@with_errors(error_response)
async def tags(request: Request) -> Response:
    """``GET /api/tags``: the placed models, in Ollama's shape."""
    context = app_state(request)
    out = []
    for m in model_objects(context):
        if not m.placed:
            continue
        card = context.node.cards.get(m.id)
        out.append({"name": m.id, "model": m.id, "modified_at": _now(), "size": card.weight_bytes if card else 0,
                    "digest": "", "details": _details(context, m.id)})
    return json_response({"models": out})


@with_errors(error_response)
async def show(request: Request) -> Response:
    """``POST /api/show``: a model's details and capabilities."""
    context = app_state(request)
    body = decode_body(await read_body(request, context.config.max_body_bytes), OllamaShowRequest)
    model = body.model or body.name
    if not model:
        raise ApiError(400, "model is required", code="missing_field", param="model")
    if model not in context.node.cards and not any(m.id == model for m in model_objects(context)):
        raise ApiError(404, f"model '{model}' not found", code="model_not_found", param="model")
    card = context.node.cards.get(model)
    capabilities = ["completion", "tools"]
    if card is not None and (card.thinking_toggle or card.reasoning_format in ("think", "harmony")):
        capabilities.append("thinking")
    info: dict[str, Any] = {}
    if card is not None:
        info = {"general.architecture": card.family, f"{card.family}.context_length": card.context_length,
                f"{card.family}.block_count": card.n_layers, f"{card.family}.embedding_length": card.hidden_size}
    return json_response({"modelfile": "", "parameters": "", "template": "", "details": _details(context, model),
                          "model_info": info, "capabilities": capabilities, "modified_at": _now()})


async def version(request: Request) -> Response:
    """``GET /api/version``."""
    return json_response({"version": OLLAMA_VERSION, "skulk_version": app_state(request).node.version})
