"""The HTTP routes: OpenAI's chat completions, completions and models, plus /health and /metrics.

FastAPI runs the blocking libdjinn calls in its thread pool; a stream is a sync generator that
Starlette iterates there too, one SSE event per text delta.
"""
import asyncio
import itertools
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from libdjinn.client import BadRequest, ContextOverflow, DjinnError, NoCapacity
from libdjinn.openai.body_limit import BodyLimit
from libdjinn.openai.daemon_link import DaemonDown
from libdjinn.openai.errors import ApiError, error_json, error_response, on_api_error, on_validation_error
from libdjinn.openai.front import Front
from libdjinn.openai.metrics import FrontMetrics
from libdjinn.openai.schemas import ChatRequest, CompletionRequest
from libdjinn.openai.turn import Outcome


log = logging.getLogger("djinn-openai")


def create_app(front: Front) -> FastAPI:
    metrics = FrontMetrics(front)
    # /health and /metrics on their own threads: requests hold the shared pool's for whole turns
    side = ThreadPoolExecutor(max_workers=2, thread_name_prefix="djinn-openai-health")

    async def off_the_request_path(fn):
        return await asyncio.get_running_loop().run_in_executor(side, fn)

    @asynccontextmanager
    async def lifespan(app):
        stop = threading.Event()
        threading.Thread(target=front.expire_loop, args=(stop,), daemon=True).start()
        threading.Thread(target=metrics.watch.run, args=(stop,), daemon=True).start()
        yield
        stop.set()

    app = FastAPI(title="djinn-openai", lifespan=lifespan)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_bug)
    app.add_middleware(BodyLimit, max_bytes=front.config.max_body_bytes)

    @app.get("/health")
    async def health():
        if await off_the_request_path(metrics.watch.latest) is None:
            return JSONResponse({"status": "daemon down", "error": metrics.watch.down}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = await off_the_request_path(metrics.render)
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": front.config.model_name, "object": "model", "created": 0,
                                            "owned_by": "djinn"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await serve(req, front.chat_turn, ChatShape(req.model, front, metrics))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await serve(req, front.completion_turn, CompletionShape(req.model, front, metrics))

    async def serve(req, make_turn, shape):
        front.check_model(req.model)
        events = guarded(lambda: make_turn(req).events())
        first = await run_in_threadpool(next, events)    # daemon errors become HTTP errors here
        if req.stream:
            return StreamingResponse(shape.sse(first, events, req.include_usage()), media_type="text/event-stream")
        return await run_in_threadpool(shape.whole, first, events)

    return app


async def on_bug(request, e: Exception):
    """Whatever else goes wrong is still OpenAI's JSON error (was: 500 with a plain-text body)."""
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))


def guarded(make_events):
    """Map what can go wrong below to OpenAI errors: before the first event they become the reply."""
    try:
        yield from make_events()
    except DaemonDown as e:
        raise ApiError(503, str(e), "server_error", None, "daemon_unavailable")
    except ContextOverflow as e:
        raise ApiError(400, e.message, "invalid_request_error", "messages", "context_length_exceeded")
    except BadRequest as e:
        raise ApiError(400, e.message, "invalid_request_error")
    except NoCapacity as e:
        raise ApiError(503, e.message, "server_error", None, "no_capacity")
    except DjinnError as e:
        raise ApiError(500, f"{e.code.name}: {e.message}", "server_error")


class Shape:
    """How one endpoint's replies look, whole or as a stream of chunks."""
    object = ""

    def __init__(self, model: str, front: Front, metrics: FrontMetrics):
        self.model, self.front, self.metrics = model, front, metrics
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        self.started, self.first_at = time.monotonic(), None

    def base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def collect(self, first, events) -> Outcome:
        """Run the turn to its end (so the conversation is recorded) and keep its Outcome."""
        return [item for item in [first, *events] if isinstance(item, Outcome)][0]

    def whole(self, first, events) -> JSONResponse:
        outcome = self.collect(first, events)
        self.finished(outcome)
        return JSONResponse(self.base(self.object) | {"choices": [self.choice(outcome)], "usage": usage(outcome)})

    def sse(self, first, events, include_usage: bool):
        try:
            for item in itertools.chain([first], events):     # as they come: a list would wait for the end
                if isinstance(item, Outcome):
                    outcome = item
                elif item:
                    if self.first_at is None:
                        self.first_at = time.monotonic()
                        self.metrics.first_token.observe(self.first_at - self.started)
                    yield event(self.chunk({"delta": self.delta(item)}))
            self.finished(outcome)
            yield event(self.chunk(self.last(outcome)))
            if include_usage:
                yield event(self.base(self.chunk_object) | {"choices": [], "usage": usage(outcome)})
        except ApiError as e:           # after the headers: report it in the stream, as OpenAI does
            yield event(error_json(e))
        yield "data: [DONE]\n\n"

    def chunk(self, choice: dict) -> dict:
        return self.base(self.chunk_object) | {"choices": [{"index": 0, "finish_reason": None} | choice]}

    def finished(self, outcome: Outcome):
        self.metrics.request_done(outcome, self.started)


class ChatShape(Shape):
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, o: Outcome) -> dict:
        message = {"role": "assistant", "content": o.content}
        if o.tool_calls:
            message["tool_calls"] = o.tool_calls
        return {"index": 0, "message": message, "finish_reason": o.finish_reason, "logprobs": None}

    def delta(self, text: str) -> dict:
        return {"role": "assistant", "content": text}

    def last(self, o: Outcome) -> dict:
        delta = {}
        if o.tool_calls:
            delta["tool_calls"] = [c | {"index": i} for i, c in enumerate(o.tool_calls)]
        return {"delta": delta, "finish_reason": o.finish_reason}


class CompletionShape(Shape):
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def choice(self, o: Outcome) -> dict:
        return {"index": 0, "text": o.content or "", "finish_reason": o.finish_reason, "logprobs": None}

    def chunk(self, choice: dict) -> dict:
        choice = {"text": choice.pop("delta", "")} | choice
        return self.base(self.chunk_object) | {"choices": [{"index": 0, "finish_reason": None, "logprobs": None}
                                                           | choice]}

    def delta(self, text: str) -> str:
        return text

    def last(self, o: Outcome) -> dict:
        return {"delta": "", "finish_reason": o.finish_reason}


def usage(o: Outcome) -> dict:
    return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
            "total_tokens": o.prompt_tokens + o.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": o.cached_tokens}}


def event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
