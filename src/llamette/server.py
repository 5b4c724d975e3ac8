"""An OpenAI-compatible HTTP server over the batching engine (`llamette serve`).

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /v1/embeddings, and beside them llama.cpp's POST /tokenize and POST /detokenize and
Prometheus' GET /metrics. The engine decodes on its own thread; handlers only check requests,
queue them and relay the engine's events (handed to the event loop with call_soon_threadsafe),
and grammars for structured output are compiled on a worker thread, so the loop never waits on
the model.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llamette.chat_template import ChatTemplate, chat_template_for
from llamette.completion import (
    COMPLETION_MAX_TOKENS,
    Answer,
    StopStrings,
    are_token_ids,
    chat_messages,
    make_sampler,
    max_tokens_for,
    stop_strings,
    stop_token_set,
    token_text,
)
from llamette.engine import Engine, Event, QueueFull, Request, ShuttingDown
from llamette.errors import BadParameter, LlametteError
from llamette.formats import find_tokenizer, load_weights
from llamette.kernels.kv_cache import KV_TYPES, scale_columns
from llamette.metrics import Metrics
from llamette.model import Transformer
from llamette.sampler import MAX_TOP_LOGPROBS, Sampler
from llamette.structured import Grammars
from llamette.tokenizer import Tokenizer
from llamette.weights import ModelConfig

MAX_BODY_BYTES = 8 * 1024 * 1024  # a request body's default limit (--max-body)
MAX_BATCH = 16  # requests decoded together by default (--max-batch), each with a KV-cache slot
KNOWN_PATHS = frozenset({"/health", "/metrics", "/tokenize", "/detokenize", "/v1/models",
                         "/v1/completions", "/v1/chat/completions", "/v1/embeddings"})  # fmt: skip

log = logging.getLogger("llamette")


@dataclass
class ServedModel:
    """What the server serves: one model under one name."""

    name: str
    engine: Engine
    tokenizer: Tokenizer
    template: ChatTemplate
    created: int  # Unix time, for /v1/models
    api_key: str | None = None  # asked of every request but /health, as a Bearer token
    max_body: int = MAX_BODY_BYTES  # a larger request body is answered 413

    def __post_init__(self):
        self.grammars = Grammars(self.tokenizer, self.engine.end_ids)  # for response_format
        self.metrics = self.engine.metrics = Metrics()

    @property
    def context(self) -> int:
        return self.engine.model.config.seq_len

    @classmethod
    def load(cls, model_path: str, tokenizer_path: str | None = None, max_batch: int = MAX_BATCH,
             max_queue: int = 64, ctx: int | None = None, name: str | None = None,
             kv_budget: int | None = None, kv_type: str = "f32") -> ServedModel:  # fmt: skip
        """Load a model file for serving: `max_batch` KV-cache slots of `ctx` positions, whose
        memory is taken as positions are written, within `kv_budget` positions in all (see
        kv_budget_for), in `kv_type`. (The engine compiles or loads its kernels when it starts,
        before the first request.)"""
        weights = load_weights(model_path)
        if ctx is not None and not 1 < ctx <= weights.config.seq_len:
            raise LlametteError(
                f"--ctx: {ctx} is outside 2..{weights.config.seq_len} (the model's context)"
            )
        if max_batch < 1 or max_queue < 0:
            raise LlametteError("--max-batch must be 1 or more and --max-queue 0 or more")
        ctx = ctx or weights.config.seq_len
        weight_bytes = sum(getattr(tensor, "nbytes", 0) for tensor in weights.tensors.values())
        model = Transformer(weights, n_slots=max_batch, seq_len=ctx, kv_type=kv_type)
        budget = kv_budget_for(weights.config, ctx, max_batch, kv_budget, weight_bytes, kv_type)
        tokenizer = find_tokenizer(model_path, tokenizer_path, model.config.vocab_size, "-z")
        engine = Engine(model, tokenizer, max_queue, chunked_prefill=True, kv_budget=budget)
        name = name or os.path.splitext(os.path.basename(model_path))[0]
        return cls(name, engine, tokenizer, chat_template_for(model_path),
                   int(os.path.getmtime(model_path)))  # fmt: skip


KV_MEMORY_SHARE = 0.5  # of the memory available beside the weights, for the default KV budget


def available_memory() -> int:
    """Bytes the system can give without swapping (Linux's MemAvailable)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_budget_for(config: ModelConfig, ctx: int, max_batch: int, kv_budget: int | None,
                  weight_bytes: int, kv_type: str = "f32") -> int:  # fmt: skip
    """KV-cache positions all requests may hold together: `kv_budget`, or by default what fits
    in half the memory available beside the weights (at most `max_batch` whole contexts). A
    budget that cannot hold one request of `ctx` positions, or that the memory cannot hold, is
    an error."""
    position_bytes = kv_position_bytes(config, kv_type)
    gib = 2**30
    spare = max(0, available_memory() - weight_bytes)
    if kv_budget is None:
        budget = min(int(KV_MEMORY_SHARE * spare) // position_bytes, max_batch * ctx)
        if budget < ctx:
            raise LlametteError(
                f"--ctx: one request of {ctx} positions needs a KV cache of "
                f"{ctx * position_bytes / gib:.2f} GiB, beyond half the {spare / gib:.1f} GiB "
                "of memory available beside the weights: lower --ctx or give --kv-budget"
            )
        return budget
    if kv_budget < ctx:
        raise LlametteError(f"--kv-budget: {kv_budget} positions cannot hold one request of "
                            f"--ctx {ctx}")  # fmt: skip
    budget = min(kv_budget, max_batch * ctx)
    if budget * position_bytes > spare:
        raise LlametteError(
            f"--kv-budget: {budget} positions take {budget * position_bytes / gib:.2f} GiB, "
            f"more than the {spare / gib:.1f} GiB of memory available beside the weights"
        )
    return budget


def kv_position_bytes(config: ModelConfig, kv_type: str = "f32") -> int:
    """Bytes of KV cache one position takes: every layer's keys and values (and their scales)."""
    values = config.head_size * np.dtype(KV_TYPES[kv_type]).itemsize
    scales = scale_columns(kv_type, config.head_size) * 4
    return 2 * config.n_layers * config.n_kv_heads * (values + scales)


class ApiError(Exception):
    """A request the server refuses, answered in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind
        )  # fmt: skip
        self.headers = headers


def error_response(error: ApiError) -> JSONResponse:
    body = {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}
    return JSONResponse({"error": body}, error.status, headers=error.headers)


WARMING_UP_RETRY_SECONDS = 2


def check_ready(served: ServedModel) -> None:
    """503 until the engine's kernels are loaded (the first run on a machine compiles them)."""
    engine = served.engine
    if engine.failure is not None:
        raise ApiError(503, f"the model could not start: {engine.failure}", kind="server_error")
    if not engine.ready.is_set():
        raise ApiError(503, "the model is warming up (loading or compiling its kernels): retry "
                       "shortly", code="warming_up", kind="server_error",
                       headers={"Retry-After": str(WARMING_UP_RETRY_SECONDS)})  # fmt: skip


def create_app(served: ServedModel) -> Starlette:
    """The ASGI application; its lifespan starts and stops the engine's thread. It takes
    connections at once, answering 503 (with Retry-After) until the engine is ready."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        served.engine.start(wait=False)
        try:
            yield
        finally:
            served.engine.stop()

    async def health(http: HttpRequest) -> JSONResponse:
        check_ready(served)
        return JSONResponse({"status": "ok", "model": served.name, **served.engine.stats()})

    async def models(http: HttpRequest) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(served)]})

    async def model(http: HttpRequest) -> JSONResponse:
        if http.path_params["model"] != served.name:
            raise unknown_model(http.path_params["model"], served)
        return JSONResponse(model_card(served))

    async def completions(http: HttpRequest):
        check_ready(served)
        body = await json_body(http)
        check_model(body, served)
        prompt_tokens = parse_prompt(body, served.tokenizer)
        return await generate(http, served, body, prompt_tokens, chat=False)

    async def chat_completions(http: HttpRequest):
        check_ready(served)
        body = await json_body(http)
        check_model(body, served)
        messages = chat_messages(field(body, "messages", list))
        try:
            prompt_tokens = served.template.tokens(messages, served.tokenizer)
        except LlametteError as error:
            raise ApiError(400, str(error), "messages") from None
        return await generate(http, served, body, prompt_tokens, chat=True)

    async def embeddings(http: HttpRequest):
        check_ready(served)
        body = await json_body(http)
        check_model(body, served)
        inputs = parse_embedding_inputs(body, served.tokenizer, served.context)
        encoding = field(body, "encoding_format", str, "float")
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"encoding_format: {encoding!r} is not float or base64",
                           "encoding_format")  # fmt: skip
        vectors = [await embed(served, tokens) for tokens in inputs]
        if encoding == "base64":  # float32 little-endian, as OpenAI's client decodes it
            vectors = [base64.b64encode(np.asarray(v, "<f4").tobytes()).decode() for v in vectors]
        count = sum(len(tokens) for tokens in inputs)
        return JSONResponse({
            "object": "list", "model": served.name,
            "data": [{"object": "embedding", "index": i, "embedding": vector}
                     for i, vector in enumerate(vectors)],
            "usage": {"prompt_tokens": count, "total_tokens": count},
        })  # fmt: skip

    async def tokenize(http: HttpRequest) -> JSONResponse:
        """llama.cpp's /tokenize: content's ids (BOS if add_special and the model adds one;
        special tokens' text parsed unless parse_special is false), with their pieces if asked."""
        body = await json_body(http)
        content = field(body, "content", str)
        add_special = field(body, "add_special", bool, False)
        tokens = served.tokenizer.encode(
            content, bos=add_special and served.tokenizer.add_bos,
            special=field(body, "parse_special", bool, True),
        )  # fmt: skip
        if field(body, "with_pieces", bool, False):
            pieces = [token_text(served.tokenizer, t) for t in tokens]
            return JSONResponse({"tokens": [{"id": t, "piece": p} for t, p in zip(tokens, pieces,
                                                                                strict=True)]})  # fmt: skip
        return JSONResponse({"tokens": tokens})

    async def detokenize(http: HttpRequest) -> JSONResponse:
        body = await json_body(http)
        tokens = field(body, "tokens", list)
        vocab_size = served.tokenizer.vocab_size
        if not are_token_ids(tokens, vocab_size):
            raise ApiError(400, f"tokens: must be token ids within 0..{vocab_size - 1}", "tokens")
        return JSONResponse({"content": served.tokenizer.decode(tokens)})

    async def metrics(http: HttpRequest) -> Response:
        engine = served.engine
        stats = engine.stats()
        gauges = {
            "llamette_requests_running": ("Requests decoding now.", stats["running"]),
            "llamette_requests_waiting": ("Requests queued for a slot.", stats["waiting"]),
            "llamette_kv_slots": ("KV-cache slots (one request's context each).", stats["slots"]),
            "llamette_kv_slots_used": ("KV-cache slots held by requests.", engine.slots_used()),
            "llamette_kv_budget_positions": ("KV-cache positions all requests may hold.",
                                             stats["kv_budget"]),
            "llamette_kv_positions_used": ("KV-cache positions holding memory (requests' and "
                                           "the prompt cache's).", stats["kv_held"]),
        }  # fmt: skip
        return Response(served.metrics.render(gauges),
                        media_type="text/plain; version=0.0.4; charset=utf-8")  # fmt: skip

    async def api_error(http: HttpRequest, error: ApiError) -> JSONResponse:
        return error_response(error)

    async def bad_parameter(http: HttpRequest, error: BadParameter) -> JSONResponse:
        return error_response(ApiError(400, str(error), error.name))

    async def http_error(http: HttpRequest, error: HTTPException) -> JSONResponse:
        message = f"{error.detail}: {http.method} {http.url.path}"
        return error_response(ApiError(error.status_code, message, code=str(error.status_code)))

    async def server_error(http: HttpRequest, error: Exception) -> JSONResponse:
        """An error of llamette's own: its traceback to the log under an id, the id to the
        client (never the error's text, which may hold internals)."""
        error_id = uuid.uuid4().hex[:12]
        log.error(f"internal error {error_id} answering {http.method} {http.url.path}",
                  exc_info=error)  # fmt: skip
        return error_response(ApiError(500, f"internal error (id {error_id}); the server's log "
                                       "has the details", code="internal_error",
                                       kind="server_error"))  # fmt: skip

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {ApiError: api_error, BadParameter: bad_parameter, HTTPException: http_error,
                Exception: server_error}  # fmt: skip
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.max_body = served.max_body
    return Guard(app, served)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a one-line error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        raise LlametteError(
            f"--host/--port: cannot listen on {host}:{port} ({error.strerror or error})"
        ) from None
    return sock


def run_server(served: ServedModel, sock: socket.socket, log_level: str = "info") -> None:
    """Serve on a bound socket until SIGTERM or Ctrl-C: then take no more requests, end the
    running ones (their clients get what was generated and finish_reason "abort"), stop."""
    config = uvicorn.Config(create_app(served), log_level=log_level, timeout_graceful_shutdown=3)
    DrainingServer(config, served.engine).run(sockets=[sock])


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which ends the engine's requests before it waits for their
    connections to close."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.drain()
        await super().shutdown(sockets)
        # uvicorn raises the stopping signal again once it is done, to die by it; this stop was
        # the signal's purpose, carried out: the process exits 0 instead
        self._captured_signals.clear()


class Guard:
    """ASGI middleware before every route: the API key (a Bearer token, compared in constant
    time; /health needs none) and the count of answers by path and status."""

    def __init__(self, app, served: ServedModel):
        self.app, self.served = app, served
        key = served.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = []

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            if self.expected is not None and path != "/health" and not self._authorized(scope):
                error = ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                 code="invalid_api_key")  # fmt: skip
                await error_response(error)(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            route = path if path in KNOWN_PATHS else "other"
            self.served.metrics.answered(route, status[0] if status else 0)

    def _authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)


def model_card(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "llamette"}


def unknown_model(name: str, served: ServedModel) -> ApiError:
    return ApiError(404, f"model {name!r} is not served here (this server has {served.name!r})",
                    "model", "model_not_found")  # fmt: skip


# Reading requests


async def json_body(http: HttpRequest) -> dict:
    limit = http.app.state.max_body
    too_large = ApiError(413, f"the body is larger than this server's limit of {limit} bytes",
                         code="body_too_large")  # fmt: skip
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


REQUIRED = object()
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
              list: "an array", dict: "an object"}  # fmt: skip


def field(body: dict, name: str, kind: type | tuple[type, ...], default=REQUIRED):
    """body[name] checked against kind (int counts as a number, bool does not); null or absent
    gives the default, or a 400 for a required field."""
    value = body.get(name)
    if value is None:
        if default is REQUIRED:
            raise ApiError(400, f"{name}: required", name, "missing_required_parameter")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = (*kinds, int)
    if (
        float in kinds
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not _finite(value)
    ):
        raise ApiError(400, f"{name}: must be a finite number", name, "invalid_value")
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(
            TYPE_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,))
        )
        raise ApiError(400, f"{name}: must be {expected}, not {json.dumps(value)[:40]}", name,
                       "invalid_type")  # fmt: skip
    return value


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float's range
        return False


def check_model(body: dict, served: ServedModel) -> None:
    name = field(body, "model", str)
    if name != served.name:
        raise unknown_model(name, served)


def parse_prompt(body: dict, tokenizer: Tokenizer) -> list[int]:
    """A completion's prompt: a string (encoded with BOS if the model adds one), one string in an
    array, or token ids."""
    prompt = field(body, "prompt", (str, list))
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < tokenizer.vocab_size for t in prompt):
                raise ApiError(400, f"prompt: token ids must be within 0..{tokenizer.vocab_size - 1}",
                               "prompt")  # fmt: skip
            return list(prompt)
        else:
            raise ApiError(400, "prompt: must be a string or an array of token ids (one prompt "
                           "per request)", "prompt")  # fmt: skip
    tokens = tokenizer.encode(prompt, bos=tokenizer.add_bos)
    if not tokens:  # a model that adds no BOS, and no prompt: start from its BOS
        if tokenizer.bos_id is None:
            raise ApiError(400, "prompt: empty, and the model has no BOS token to start from",
                           "prompt")  # fmt: skip
        tokens = [tokenizer.bos_id]
    return tokens


def parse_embedding_inputs(body: dict, tokenizer: Tokenizer, context: int) -> list[list[int]]:
    """An embedding request's inputs as token lists: a string, an array of strings, an array of
    token ids or an array of such arrays; each encoded as a prompt is (BOS if the model adds
    one) and within the context."""
    given = field(body, "input", (str, list))
    if isinstance(given, str) or (given and all(isinstance(t, int) for t in given)):
        given = [given]
    if not given:
        raise ApiError(400, "input: must not be empty", "input")
    inputs = []
    for item in given:
        if isinstance(item, str):
            tokens = tokenizer.encode(item, bos=tokenizer.add_bos)
        elif isinstance(item, list) and are_token_ids(item, tokenizer.vocab_size):
            tokens = list(item)
        else:
            raise ApiError(400, "input: must be a string, an array of strings, or token ids "
                           f"within 0..{tokenizer.vocab_size - 1} (or arrays of them)", "input")  # fmt: skip
        if not tokens or len(tokens) > context:
            raise ApiError(400, f"input: {len(tokens)} tokens; 1 to {context} fit", "input")
        inputs.append(tokens)
    return inputs


async def embed(served: ServedModel, tokens: list[int]) -> list[float]:
    """One input's embedding, computed on the engine's thread between its rounds."""
    relay = Relay(asyncio.get_running_loop())
    request = Request(tokens, 0, Sampler(served.tokenizer.vocab_size, 0.0), relay.sender(0),
                      embed=True)  # fmt: skip
    try:
        served.engine.submit(request)
    except QueueFull as error:
        raise ApiError(429, f"server busy: {error}", code="queue_full",
                       kind="rate_limit_error") from None  # fmt: skip
    _, event = await relay.queue.get()
    if event.embedding is None:
        raise ApiError(500, f"embedding failed: {event.error}", kind="server_error")
    return event.embedding


@dataclass(frozen=True)
class Options:
    """How one request samples, stops and answers."""

    max_tokens: int
    samplers: list[Sampler]  # one per choice
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]  # ending a choice beside the model's end ids
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs
    echo: bool  # a completion's text (and logprobs) start with the prompt's


def parse_options(body: dict, n_prompt: int, context: int, chat: bool, vocab_size: int,
                  max_choices: int) -> Options:  # fmt: skip
    """The request's fields, their JSON types checked here and their values by
    completion.make_sampler and max_tokens_for (a BadParameter: 400 naming the field). Choice
    i of `n` samples with seed + i."""
    max_tokens = field(body, "max_tokens", int, None)
    if chat and max_tokens is None:
        max_tokens = field(body, "max_completion_tokens", int, None)
    max_tokens = max_tokens_for(max_tokens, n_prompt, context,
                                None if chat else COMPLETION_MAX_TOKENS,
                                prompt_name="messages" if chat else "prompt")  # fmt: skip
    logit_bias = {}
    for key, value in field(body, "logit_bias", dict, {}).items():
        if not re.fullmatch(r"-?[0-9]+", key):
            raise ApiError(400, f"logit_bias: {key!r} is not a token id", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise ApiError(400, f"logit_bias: the bias of {key} must be a number", "logit_bias")
        logit_bias[int(key)] = float(value)
    n = field(body, "n", int, 1)
    if not 1 <= n <= max_choices:
        raise ApiError(400, f"n: must be within 1..{max_choices} (the server's slots), not {n}",
                       "n")  # fmt: skip
    seed = field(body, "seed", int, None)  # any integer, as OpenAI's API takes
    seed = secrets.randbits(63) if seed is None else seed
    sampling = dict(
        temperature=field(body, "temperature", float, 1.0),
        top_p=field(body, "top_p", float, 1.0),
        top_k=field(body, "top_k", int, 0),
        min_p=field(body, "min_p", float, 0.0),
        logit_bias=logit_bias,
        repeat_penalty=field(body, "repeat_penalty", float, 1.0),
        repeat_last_n=field(body, "repeat_last_n", int, 64),
        frequency_penalty=field(body, "frequency_penalty", float, 0.0),
        presence_penalty=field(body, "presence_penalty", float, 0.0),
    )
    samplers = [make_sampler(vocab_size, seed=seed + i, **sampling) for i in range(n)]
    stop = stop_strings(field(body, "stop", (str, list), []))
    stop_token_ids = stop_token_set(field(body, "stop_token_ids", list, []), vocab_size)

    if chat:  # logprobs: true, with top_logprobs alternatives
        top = field(body, "top_logprobs", int, None)
        logprobs = (top or 0) if field(body, "logprobs", bool, False) else None
        if top is not None and logprobs is None:
            raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        echo, name = False, "top_logprobs"
    else:  # logprobs: N alternatives
        logprobs, name = field(body, "logprobs", int, None), "logprobs"
        echo = field(body, "echo", bool, False)
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"{name}: must be within 0..{MAX_TOP_LOGPROBS}, not {logprobs}", name)
    stream = field(body, "stream", bool, False)
    stream_options = field(body, "stream_options", dict, {})
    include_usage = field(stream_options, "include_usage", bool, False)
    return Options(max_tokens, samplers, stop, stop_token_ids, stream, include_usage, logprobs,
                   echo)  # fmt: skip


# Answering


async def generate(http: HttpRequest, served: ServedModel, body: dict, prompt_tokens: list[int],
                   chat: bool):  # fmt: skip
    tokenizer = served.tokenizer
    options = parse_options(body, len(prompt_tokens), served.context, chat, tokenizer.vocab_size,
                            served.engine.n_slots)  # fmt: skip
    relay = Relay(asyncio.get_running_loop())
    requests = []
    for index, sampler in enumerate(options.samplers):
        sampler.accept(prompt_tokens)
        requests.append(Request(
            prompt_tokens, options.max_tokens, sampler, relay.sender(index),
            StopStrings(options.stop), strip_leading_space=chat, logprobs=options.logprobs,
            end_ids=served.engine.end_ids | options.stop_token_ids,
            echo_logprobs=options.echo and options.logprobs is not None,
        ))  # fmt: skip
    response_format = field(body, "response_format", dict, None)
    constraint = None
    if response_format is not None:  # compiling a grammar can take a while: not on the loop
        constraint = await asyncio.to_thread(served.grammars.constraint, response_format)
    if constraint is not None:
        for request in requests:
            request.constraint, constraint = constraint, constraint.copy()
    requests[0].siblings = requests[1:]  # one pass of the prompt for all the choices
    try:
        served.engine.submit(requests[0])
    except ShuttingDown as error:
        raise ApiError(503, str(error), code="shutting_down", kind="server_error") from None
    except QueueFull as error:
        raise ApiError(429, f"server busy: {error}", code="queue_full",
                       kind="rate_limit_error") from None  # fmt: skip
    echoed = tokenizer.decode(prompt_tokens) if options.echo else ""
    answer = Answer.for_prompt(served.name, chat, prompt_tokens, tokenizer,
                               options.logprobs is not None, options.echo)  # fmt: skip
    if options.stream:
        chunks = stream_chunks(answer, relay, len(requests), options.include_usage, echoed)
        return EventStream(chunks, requests, relay)
    watcher = asyncio.ensure_future(watch_disconnect(http.receive, requests, relay))
    texts = [[echoed] for _ in requests]
    logprobs: list[list] = [[] for _ in requests]
    ends: dict[int, Event] = {}
    try:
        while len(ends) < len(requests):
            index, event = await relay.queue.get()
            if event.finish_reason == "error":
                raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
            if event.finish_reason == "cancelled":
                return Response(status_code=499)  # nobody is listening
            texts[index].append(event.text)
            logprobs[index] += event.logprobs
            if event.finish_reason:
                ends[index] = event
    finally:
        watcher.cancel()
        for request in requests:  # an error or a disconnect: the other choices stop too
            request.cancelled = True
    choices = [
        ("".join(texts[i]), ends[i].finish_reason, logprobs[i]) for i in range(len(requests))
    ]
    return JSONResponse(answer.whole(choices, sum(e.completion_tokens for e in ends.values())))


class Relay:
    """Events from the engine's thread, queued on the event loop with their choice's index."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def sender(self, index: int) -> Callable[[Event], None]:
        """The on_event of choice `index`."""

        def put(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return put


async def watch_disconnect(receive: Callable, requests: list[Request], relay: Relay) -> None:
    """Cancel the requests when their client goes away."""
    while (await receive())["type"] != "http.disconnect":
        pass
    for request in requests:
        request.cancelled = True
    relay.queue.put_nowait((0, Event(finish_reason="cancelled")))


async def stream_chunks(
    answer: Answer, relay: Relay, n: int, include_usage: bool, echoed: str = ""
) -> AsyncIterator[dict | str]:
    """A stream's events: chunks until each of the n choices has its finish_reason (then the
    usage, if asked for), or an error object; each choice's first chunk starts with `echoed`."""
    if answer.chat:
        for index in range(n):
            yield answer.chunk(None, role=True, index=index)
    prefixes, completion_tokens, ended = [echoed] * n, 0, 0
    while ended < n:
        index, event = await relay.queue.get()
        if event.finish_reason == "cancelled":
            return
        if event.finish_reason == "error":
            yield {"error": {"message": f"generation failed: {event.error}",
                             "type": "server_error", "param": None, "code": None}}  # fmt: skip
            return
        text, prefixes[index] = prefixes[index] + event.text, ""
        for chunk in answer.event_chunks(text, event.finish_reason, event.logprobs, index):
            yield chunk
        if event.finish_reason:
            completion_tokens += event.completion_tokens
            ended += 1
    if include_usage:
        yield answer.usage_chunk(completion_tokens)
    yield "[DONE]"


class EventStream:
    """A server-sent-events response that cancels its requests when the client goes away."""

    def __init__(self, events: AsyncIterator[dict | str], requests: list[Request], relay: Relay):
        self.events, self.requests, self.relay = events, requests, relay

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                   (b"cache-control", b"no-cache")]  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        watcher = asyncio.ensure_future(watch_disconnect(receive, self.requests, self.relay))
        try:
            async for event in self.events:
                data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
                message = f"data: {data}\n\n".encode()
                await send({"type": "http.response.body", "body": message, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were sending
            pass
        finally:
            watcher.cancel()
            for request in self.requests:
                request.cancelled = True  # a no-op once it has finished
