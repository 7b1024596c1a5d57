"""`vlm-peft serve`: an OpenAI-compatible chat-completions server and a web chat page, in one process.

FastAPI on uvicorn: the most used ASGI stack in Python (vLLM's OpenAI server runs on it), maintained, with
request-body limits and streaming responses built in, and no build step for the page it serves.

Each request is checked, its images decoded and its prompt rendered as it arrives (so a bad one is a 4xx
at once), then it waits in a bounded queue (full: 429). One worker thread runs one generation at a time,
no batching: `model.generate` on one conversation is what `vlm-peft chat` runs, so the answers are the
same. Streaming hands `TextStreamer`'s pieces from that thread to the event loop as they are decoded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import jinja2
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .generation import TextFilter, Turn, generate_turn, generation_kwargs, render
from .openai_schema import APIError, ChatRequest, Limits, bad, parse_chat_request

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    model_name: str
    limits: Limits = field(default_factory=Limits)
    max_queue: int = 16  # requests waiting while one generates
    # Used where a request leaves them out; the defaults are `vlm-peft chat`'s (greedy), not OpenAI's (1.0).
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.8


class _Job:
    """One queued request. The worker thread sends its text pieces, then a `Turn` or an exception."""

    def __init__(self, request: ChatRequest, inputs: dict, generation: dict, loop: asyncio.AbstractEventLoop):
        self.request, self.inputs, self.generation, self.loop = request, inputs, generation, loop
        self.cancel = threading.Event()  # the client left, or the text reached a stop string
        self.events: asyncio.Queue = asyncio.Queue()
        self.filter = TextFilter(request.stop)

    def run(self, model: torch.nn.Module, processor: Any) -> None:
        def on_text(piece: str, stream_end: bool = False) -> None:
            out = self.filter.feed(piece) + (self.filter.finish() if stream_end else "")
            if out:
                self._send(out)
            if self.filter.stopped:
                self.cancel.set()

        try:
            turn = generate_turn(
                model,
                processor,
                self.inputs,
                on_text=on_text,
                stop=self.request.stop,
                cancel=self.cancel,
                seed=self.request.seed,
                **self.generation,
            )
            if self.filter.stopped:
                turn.finish_reason = "stop"
            self._send(turn)
        except Exception as err:  # noqa: BLE001 - reported to this request's client; the server goes on
            logger.exception("generation failed")
            self._send(err)

    def _send(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


def _failure(err: Exception) -> APIError:
    if isinstance(err, ValueError):
        return bad("messages", str(err))
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", code="generation_failed")


def _usage(turn: Turn) -> dict[str, int]:
    return {
        "prompt_tokens": turn.prompt_tokens,
        "completion_tokens": turn.completion_tokens,
        "total_tokens": turn.prompt_tokens + turn.completion_tokens,
    }


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def create_app(model: torch.nn.Module, processor: Any, config: ServeConfig) -> FastAPI:
    """The server for a loaded (model, processor): `/v1/models`, `/v1/chat/completions`, `/health`, and the
    chat page at `/`."""
    limits = config.limits
    context = getattr(model.config, "max_position_embeddings", None)
    device = model.device
    page = (files("vlm_peft.serving") / "static" / "index.html").read_text()
    started = int(time.time())
    state: dict[str, Any] = {"running": None}
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-peft-generate")

    async def worker() -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await state["queue"].get()
            if job.cancel.is_set():  # its client left while it waited
                continue
            state["running"] = job
            try:
                await loop.run_in_executor(executor, job.run, model, processor)
            except Exception:  # noqa: BLE001 - one job's failure must not stop the worker for every later one
                logger.exception("the generation worker failed on a request")
                job._send(APIError(500, "generation failed", code="generation_failed"))
            finally:
                state["running"] = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["queue"] = asyncio.Queue(config.max_queue)
        # Requests being read, parsed and rendered: bounded too, so that memory is bounded by the limits
        # (bodies of up to max_body each) whatever the number of connections.
        state["admitting"] = asyncio.Semaphore(config.max_queue + 1)
        task = asyncio.create_task(worker())
        yield
        task.cancel()
        if state["running"] is not None:
            state["running"].cancel.set()
        executor.shutdown(wait=False, cancel_futures=True)

    # The images the limits allow, base64-encoded, plus the text around them.
    max_body = limits.max_images * limits.max_image_bytes * 4 // 3 + 2 * 2**20
    app = FastAPI(title="vlm-peft", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.status_code)
        error = APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code)
        return JSONResponse(error.body(), status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:  # logged by uvicorn as well
        error = APIError(500, f"internal error: {type(err).__name__}: {err}", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": started, "owned_by": "vlm-peft"}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": state["queue"].qsize(), "running": state["running"] is not None}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        if name != config.model_name:
            raise _unknown_model(name)
        return model_card()

    def _unknown_model(name: str) -> APIError:
        message = f"model {name!r} is not served here; this server serves {config.model_name!r}"
        return APIError(404, message, param="model", code="model_not_found")

    def _busy() -> APIError:
        message = f"{config.max_queue} requests are already waiting (--max-queue); retry later"
        return APIError(429, message, code="queue_full")

    def prepare(body: Any) -> tuple[ChatRequest, dict, dict]:
        """Parse, decode images, render and count tokens: in a thread beside the generating one."""
        chat = parse_chat_request(body, limits)
        budget = limits.max_prompt_tokens or context
        text = sum(len(m["content"]) if isinstance(m["content"], str) else
                   sum(len(p.get("text", "")) for p in m["content"]) for m in chat.messages)  # fmt: skip
        if budget is not None and text > 16 * budget:  # no tokenizer makes a token of more than 16 characters
            raise bad(
                "messages",
                f"the messages hold {text:,} characters of text; this server takes prompts of at most {budget} "
                "tokens (--max-prompt-tokens, the model's context)",
                "prompt_too_long",
            )
        try:
            inputs = render(processor, chat.messages, think=chat.think, device=device)
        except (ValueError, jinja2.TemplateError) as err:
            raise bad("messages", str(err)) from None
        prompt = inputs["input_ids"].shape[1]
        limit = limits.max_prompt_tokens or context or prompt
        if context is not None:
            limit = min(limit, context - 1)
        if prompt > limit:
            images = sum(isinstance(m["content"], list) and sum(p["type"] == "image" for p in m["content"])
                         for m in chat.messages)  # fmt: skip
            raise bad(
                "messages",
                f"the prompt is {prompt} tokens ({images} images, {processor.num_image_tokens} tokens each, "
                f"included); this server takes at most {limit} (--max-prompt-tokens, the model's context)",
                "prompt_too_long",
            )
        room = context - prompt if context is not None else None
        max_tokens = chat.max_tokens
        if max_tokens is None:
            max_tokens = config.max_tokens if room is None else min(config.max_tokens, room)
        elif room is not None and max_tokens > room:
            raise bad(
                "max_tokens",
                f"{max_tokens} new tokens after the prompt's {prompt} exceed the model's context of {context}; "
                f"ask for at most {room}",
                "context_length_exceeded",
            )
        temperature = config.temperature if chat.temperature is None else chat.temperature
        top_p = config.top_p if chat.top_p is None else chat.top_p
        return chat, inputs, generation_kwargs(max_tokens, temperature, top_p)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        if state["admitting"].locked():
            raise _busy()
        async with state["admitting"]:
            job = await admit(request)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
        if job.request.stream:
            return StreamingResponse(_stream(job, reply), media_type="text/event-stream")
        pieces = []
        watch = asyncio.create_task(_cancel_when_gone(request, job))
        try:
            while not isinstance(item := await job.events.get(), (Turn, Exception)):
                pieces.append(item)
        finally:
            watch.cancel()
        if isinstance(item, Exception):
            raise _failure(item)
        message = {"role": "assistant", "content": "".join(pieces)}
        choice = {"index": 0, "message": message, "finish_reason": item.finish_reason, "logprobs": None}
        return {**reply, "object": "chat.completion", "choices": [choice], "usage": _usage(item)}

    async def admit(request: Request) -> _Job:
        """Read, check and render one request, and queue it."""
        size, chunks = 0, []
        async for chunk in request.stream():  # counted as it arrives: a huge body is refused, not buffered
            size += len(chunk)
            if size > max_body:
                message = f"the request body exceeds {max_body / 2**20:.0f} MiB (--max-images x --max-image-mb)"
                raise APIError(413, message, code="request_too_large")
            chunks.append(chunk)
        try:  # in a thread: a large body must not stall the event loop (and every open stream) while it parses
            body = await asyncio.to_thread(json.loads, b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
        name = body.get("model") if isinstance(body, dict) else None
        if isinstance(name, str) and name != config.model_name:
            raise _unknown_model(name)
        if state["queue"].full():
            raise _busy()
        chat, inputs, generation = await asyncio.to_thread(prepare, body)
        job = _Job(chat, inputs, generation, asyncio.get_running_loop())
        try:
            state["queue"].put_nowait(job)
        except asyncio.QueueFull:
            raise _busy() from None
        return job

    return app


async def _cancel_when_gone(request: Request, job: _Job) -> None:
    """A non-streamed request's client that hangs up: its generation stops after the current token (or is
    skipped while it waits), as a stream's does."""
    while not await request.is_disconnected():  # a non-blocking check once the body has been read
        await asyncio.sleep(0.1)
    job.cancel.set()


async def _stream(job: _Job, reply: dict[str, Any]) -> AsyncIterator[str]:
    """OpenAI's chunks: the role first, then the text as it comes, then the finish reason, (usage,) [DONE]."""
    head = {**reply, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while isinstance(item := await job.events.get(), str):
            yield chunk({"content": item})
        if isinstance(item, Exception):
            yield _sse(_failure(item).body())
        else:
            yield chunk({}, item.finish_reason)
            if job.request.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(item)})
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects: stop generating for nobody
        job.cancel.set()


class BackgroundServer:
    """uvicorn serving `app` from a daemon thread, on a free port unless one is given (tests, benchmarks,
    notebooks). A context manager: the server is up inside the `with` and stopped after it."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
        self.app, self.host, self.port, self.timeout = app, host, port, timeout
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url} within {self.timeout:.0f} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.server is not None and self.thread is not None
        self.server.should_exit = True
        self.thread.join(self.timeout)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    # Ctrl+C stops within seconds instead of waiting for the whole queue to be answered.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
