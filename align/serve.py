"""An OpenAI-compatible HTTP API over our rollout engine, deployed with Ray Serve.

    python -m align.serve --model runs/sft/final                       # Ray Serve on 127.0.0.1:8000
    python -m align.serve --model /path/to/hf-folder --port 8100 --backend vllm   # GPU
    python -m align.serve --model runs/sft/final --no-ray              # plain uvicorn, no Ray

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="final", prompt="Once upon a time", max_tokens=32)

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with
`stream: true`), `GET /health`. The served model's name is `--served-model-name`, by default
the model folder's name; a request naming another model gets 404.

The engine is the rollout engine of training (`rollout.HFEngine` on CPU, `rollout.VLLMEngine`
on GPU), so a served model samples exactly as it did in rollouts: the same stop handling, the
same `seed` semantics. Chat messages are rendered with the tokenizer's chat template, or the
fallback template SFT trained with (`align.data.chat`), and tokenized as training does.

Streaming (`stream: true`) sends OpenAI SSE chunks: for chat a role chunk per choice, then text
deltas (choice `index` = sample), then a finish-reason chunk per choice, the usage chunk when
`stream_options.include_usage`, then `data: [DONE]`. With the HF engine the deltas are token by
token: generation runs in a worker thread whose per-step callback (`on_step`, see
`rollout.base.RolloutEngine`) queues each new token, and each choice's text is re-decoded as
`HFEngine.response_text` does, the new suffix sent. Held back until the end: an incomplete UTF-8
character (a trailing U+FFFD), and with `stop` strings the last max(len(stop)) - 1 characters, so a
stop string is never streamed. The finished sample's text is authoritative: what remains of it is
sent last, so the deltas join to exactly the non-streamed text.

Honest limits:
- The vLLM engine has no per-token callback: its streamed requests are generated whole, then
  sent one word per chunk (same protocol; the first chunk arrives when generation is done).
- A streamed request whose client disconnects still runs to its end (the engine cannot stop
  mid-call), holding the replica's lock meanwhile, as a non-streamed request does.
- One generation at a time per replica. The engines are not thread-safe, so a lock serialises
  `generate`; requests beyond it wait (up to `--max-ongoing-requests` per replica, then Ray
  Serve queues them). A request with several prompts or `n > 1` is one batched call. More
  throughput: `--num-replicas N` (one engine each).
- Not supported (400): `logprobs`, `echo`, `best_of`, `suffix`, `logit_bias`, penalties.
  Other unknown fields are ignored.
- Context: a prompt that leaves no room for one new token is a 400; otherwise `max_tokens` is
  capped at what the context has left (finish_reason "length").

Security: the HTTP server binds 127.0.0.1 by default and has no authentication; bind another
host only behind something that authenticates. With Ray, Serve's proxy honours `--host`, but
Ray's own GCS and raylet ports listen on all interfaces (Ray binds them so) when this process
starts a local Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from typing import Any, AsyncIterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# ----------------------------------------------------------------------------- request schemas


class CompletionRequest(BaseModel):
    """`POST /v1/completions`: OpenAI's fields that change sampling, plus vLLM's `top_k`."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    n: int = Field(1, ge=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    # Unsupported: rejected when set to anything but their neutral value.
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(CompletionRequest):
    """`POST /v1/chat/completions`: `messages` instead of `prompt`; `max_tokens` (or
    `max_completion_tokens`) defaults to what the context has left."""

    prompt: None = None  # type: ignore[assignment]
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None  # type: ignore[assignment]
    top_logprobs: Optional[int] = None


# ------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _check_supported(req: CompletionRequest) -> None:
    """400 for the OpenAI options the engines cannot honour, naming the option."""
    unsupported = {
        "logprobs": req.logprobs not in (None, 0, False),
        "top_logprobs": bool(getattr(req, "top_logprobs", None)),
        "echo": req.echo,
        "best_of": req.best_of not in (None, 1, req.n),
        "suffix": bool(req.suffix),
        "logit_bias": bool(req.logit_bias),
        "presence_penalty": req.presence_penalty != 0,
        "frequency_penalty": req.frequency_penalty != 0,
    }
    for name, bad in unsupported.items():
        if bad:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")


# ------------------------------------------------------------------------------------- engine


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What a replica loads.

    model:          a Hugging Face model folder (or hub id), e.g. a run's `final/` folder.
    served_name:    the name clients pass as `model`; default the folder's name.
    backend:        `hf` (CPU default) or `vllm` (GPU).
    max_model_len:  the context (prompt + completion); default the model's
                    max_position_embeddings (hf) or 2048 (vllm).
    max_n:          the largest `n` a request may ask for.
    """

    model: str
    served_name: str = ""
    backend: str = "hf"
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: Optional[int] = None
    max_batch_size: int = 64
    max_n: int = 16
    gpu_memory_utilization: float = 0.8

    def name(self) -> str:
        return self.served_name or os.path.basename(os.path.normpath(self.model))


class CompletionService:
    """The engine, its tokenizer and context, behind a lock: the part of the server that is
    not HTTP. `generate` may be awaited concurrently; calls run one at a time in a thread."""

    def __init__(self, engine, tokenizer, *, name: str, context: int, max_n: int = 16):
        from align.data.tokenize import Encoder

        self.engine, self.tokenizer, self.name, self.context, self.max_n = engine, tokenizer, name, context, max_n
        self.encoder = Encoder(tokenizer)
        self.vocab_size = len(tokenizer)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, s: ServeSettings) -> "CompletionService":
        if s.backend == "vllm":
            from rollout.vllm_engine import VLLMEngine

            engine = VLLMEngine(s.model, dtype=s.dtype, max_model_len=s.max_model_len or 2048,
                                gpu_memory_utilization=s.gpu_memory_utilization)
            return cls(engine, engine.get_tokenizer(), name=s.name(), context=s.max_model_len or 2048, max_n=s.max_n)
        if s.backend != "hf":
            raise ValueError(f"backend: {s.backend!r} is not one of ['hf', 'vllm']")
        from align.models.loading import load_model_and_tokenizer
        from rollout.hf import HFEngine

        model, tokenizer = load_model_and_tokenizer(s.model, dtype=s.dtype, device=s.device)
        context = s.max_model_len or getattr(model.config, "max_position_embeddings", None) or 2048
        engine = HFEngine(model, tokenizer, max_batch_size=s.max_batch_size)
        return cls(engine, tokenizer, name=s.name(), context=context, max_n=s.max_n)

    # ---- requests to token ids ---------------------------------------------------------------

    def prompt_ids(self, prompt) -> list[list[int]]:
        """A completion request's prompt(s) as token id lists: text is tokenized as a sequence
        start (BOS added as in training); ids are taken as given."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        ids = [self.encoder.encode([(p, "start")])[0] if isinstance(p, str) else list(p) for p in prompt]
        for row in ids:
            if not row:
                raise APIError(400, "prompt: a prompt has no tokens", param="prompt")
            bad = [t for t in row if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})", param="prompt")
        return ids

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The conversation rendered with the chat template, ready for the assistant's turn."""
        from align.data.chat import render_chat

        rendered = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            text = render_chat(rendered, self.tokenizer, add_generation_prompt=True)
        except Exception as err:  # a template that rejects the conversation (e.g. role order)
            raise APIError(400, f"messages: the chat template cannot render them: {err}", param="messages") from err
        return self.encoder.encode([(text, "start")])[0]

    def sampling(self, req: CompletionRequest, prompts: list[list[int]], param: str):
        """SamplingParams for a request, after the checks that need the model (n, context)."""
        from rollout.base import SamplingParams

        _check_supported(req)
        if req.n > self.max_n:
            raise APIError(400, f"n: must be <= {self.max_n}, got {req.n}", param="n")
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                                f"{longest} tokens, leaving no room for a completion",
                           param=param, code="context_length_exceeded")
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or self.context - longest
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              max_new_tokens=max_tokens, stop=tuple(s for s in stop if s), seed=req.seed)

    async def generate(self, prompts: list[list[int]], params, on_step=None):
        """Run the engine in a worker thread, one call at a time (the engines are not thread-safe).
        `on_step` (engines that stream tokens only) is called from that thread."""
        def locked():
            with self._lock:
                if on_step is None:
                    return self.engine.generate(prompts, params)
                return self.engine.generate(prompts, params, on_step=on_step)

        try:
            return await asyncio.to_thread(locked)
        except ValueError as err:  # the engine's own checks on a request
            raise APIError(400, str(err)) from err

    async def stream(self, prompts: list[list[int]], params) -> AsyncIterator:
        """A streamed generation: (choice index, text delta) pairs, then the RolloutOutput. The
        deltas of a choice join to its sample's text. Token by token when the engine streams
        tokens (`rollout.base.streams_tokens`); else after generation, a word per delta."""
        from rollout.base import streams_tokens

        if not streams_tokens(self.engine):
            out = await self.generate(prompts, params)
            for k, s in enumerate(out.samples):
                for piece in text_pieces(s.text):
                    yield k, piece
            yield out
            return

        loop, steps = asyncio.get_running_loop(), asyncio.Queue()
        rows = [p for p in prompts for _ in range(params.n)]  # prompt-major, as the samples
        texts = [_StreamText(self.engine.response_text, row, params.stop) for row in rows]
        task = asyncio.ensure_future(
            self.generate(prompts, params, on_step=lambda *step: loop.call_soon_threadsafe(steps.put_nowait, step)))
        # Queued after every step: the thread's result reaches the loop after its last callback.
        task.add_done_callback(lambda _: steps.put_nowait(None))
        while (step := await steps.get()) is not None:
            for k, token in zip(*step):
                if delta := texts[k].add(token):
                    yield k, delta
        out = await task  # the engine's error, if any, is raised here
        for k, s in enumerate(out.samples):
            if rest := texts[k].finish(s.text):
                yield k, rest
        yield out


class _StreamText:
    """One choice's text as its tokens arrive: each `add` re-decodes the tokens so far with
    `decode(prompt, ids)` and returns the new suffix that can no longer change (see the module
    docstring for what is held back). A stop token is special, so it decodes to nothing."""

    def __init__(self, decode, prompt: list[int], stops: tuple[str, ...]):
        self.decode, self.prompt, self.stops = decode, prompt, stops
        self.hold = max(map(len, stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        from rollout.base import first_stop

        self.ids.append(token)
        text = self.decode(self.prompt, self.ids)
        # A stop string found ends the row here (the engine saw it too): cut before it.
        cut = first_stop(text, self.stops)
        return self._send(text[: len(text) - self.hold if cut is None else cut].rstrip("\ufffd"))

    def finish(self, text: str) -> str:
        """What remains of the sample's final text."""
        return self._send(text)

    def _send(self, text: str) -> str:
        # Only extensions of what was sent go out: a decode that rewrote earlier text waits.
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


# -------------------------------------------------------------------------------------- the app


def create_app(service: CompletionService):
    """The FastAPI app: OpenAI routes over `service`, errors in OpenAI's shape."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="align OpenAI-compatible server")

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        # OpenAI answers malformed requests with 400 (FastAPI's default is 422).
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            message, param = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
        else:
            loc = [str(p) for p in first.get("loc", ()) if p != "body"]
            message, param = f"{'.'.join(loc) or 'body'}: {first.get('msg')}", (loc[0] if loc else None)
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").body(),
                            status_code=500)

    def check_model(req: CompletionRequest) -> None:
        if req.model != service.name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{service.name}`",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0, "owned_by": "align"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req)
        prompts = service.prompt_ids(req.prompt)
        params = service.sampling(req, prompts, "prompt")
        reply = _Reply("cmpl", service.name, prompts)
        if req.stream:
            events = await _started(service.stream(prompts, params))
            return StreamingResponse(_sse(reply.completion_chunks(events, _include_usage(req))),
                                     media_type="text/event-stream")
        return reply.completion(await service.generate(prompts, params))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        check_model(req)
        prompts = [service.chat_ids(req.messages)]
        params = service.sampling(req, prompts, "messages")
        reply = _Reply("chatcmpl", service.name, prompts)
        if req.stream:
            events = await _started(service.stream(prompts, params))
            return StreamingResponse(_sse(reply.chat_chunks(events, params.n, _include_usage(req))),
                                     media_type="text/event-stream")
        return reply.chat(await service.generate(prompts, params))

    return app


def _include_usage(req: CompletionRequest) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


class _Reply:
    """One request's answer in OpenAI's response and stream-chunk shapes. Choice k is sample k
    of the rollout output (prompt-major: prompt k // n, sample k % n), as in OpenAI. Streams are
    built from `CompletionService.stream` events: (k, text delta) pairs, then the output."""

    def __init__(self, prefix: str, model: str, prompts: list[list[int]]):
        self.id, self.model = f"{prefix}-{uuid.uuid4().hex}", model
        self.created = int(time.time())
        self.prompt_tokens = sum(len(p) for p in prompts)

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, out) -> dict:
        completion_tokens = sum(len(s.token_ids) for s in out.samples)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def completion(self, out) -> dict:
        choices = [{"index": k, "text": s.text, "logprobs": None, "finish_reason": s.finish_reason}
                   for k, s in enumerate(out.samples)]
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage(out)}

    def chat(self, out) -> dict:
        choices = [{"index": k, "message": {"role": "assistant", "content": s.text}, "logprobs": None,
                    "finish_reason": s.finish_reason} for k, s in enumerate(out.samples)]
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage(out)}

    async def completion_chunks(self, events: AsyncIterator, include_usage: bool) -> AsyncIterator[dict]:
        kind = "text_completion"
        async for event in events:
            if isinstance(event, tuple):
                k, text = event
                yield self._chunk(kind, {"index": k, "text": text, "logprobs": None, "finish_reason": None})
                continue
            for k, s in enumerate(event.samples):
                yield self._chunk(kind, {"index": k, "text": "", "logprobs": None, "finish_reason": s.finish_reason})
            if include_usage:
                yield {**self._head(kind), "choices": [], "usage": self.usage(event)}

    async def chat_chunks(self, events: AsyncIterator, n: int, include_usage: bool) -> AsyncIterator[dict]:
        kind = "chat.completion.chunk"
        for k in range(n):
            yield self._chunk(kind, {"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for event in events:
            if isinstance(event, tuple):
                k, text = event
                yield self._chunk(kind, {"index": k, "delta": {"content": text}, "finish_reason": None})
                continue
            for k, s in enumerate(event.samples):
                yield self._chunk(kind, {"index": k, "delta": {}, "finish_reason": s.finish_reason})
            if include_usage:
                yield {**self._head(kind), "choices": [], "usage": self.usage(event)}

    def _chunk(self, kind: str, choice: dict) -> dict:
        return {**self._head(kind), "choices": [choice]}


def text_pieces(text: str) -> list[str]:
    """`text` cut into stream pieces, a word each with the whitespace before it; they join back
    to `text` exactly (trailing whitespace is a piece of its own)."""
    return re.findall(r"\s*\S+|\s+$", text)


async def _started(events: AsyncIterator) -> AsyncIterator:
    """`events` with its first item awaited now, before the response starts, so that a request
    the engine rejects gets its 400 rather than a broken 200 stream."""
    first = await anext(events)

    async def resumed():
        yield first
        async for event in events:
            yield event

    return resumed()


async def _sse(chunks: AsyncIterator[dict]):
    """Server-sent events as OpenAI sends them: `data: <json>` per chunk, then `data: [DONE]`."""
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------ Ray Serve, CLI


def serve_application(settings: ServeSettings, *, num_replicas: int = 1, max_ongoing_requests: int = 32,
                      num_cpus: float = 1.0, num_gpus: float = 0.0):
    """A bound Ray Serve application: `num_replicas` replicas, each loading its own engine and
    answering through the FastAPI app of `create_app` (built in the replica, after the engine)."""
    from ray import serve

    @serve.deployment(name="align-openai", num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
                      ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})
    @serve.ingress()
    class OpenAIServer:
        def __init__(self, settings: ServeSettings):
            self.service = CompletionService.from_settings(settings)

        def __serve_build_asgi_app__(self):
            return create_app(self.service)

    return OpenAIServer.bind(settings)


def run_ray(settings: ServeSettings, args: argparse.Namespace) -> None:
    """Start (or join) Ray, deploy, print the address, and serve until SIGINT/SIGTERM."""
    import ray
    from ray import serve

    from align.lifecycle import watch_ray_session

    context = ray.init(address=args.ray_address or "local", include_dashboard=False, num_cpus=args.ray_num_cpus,
                       log_to_driver=True)
    # a Ray of our own is ended by a watchdog should this process be SIGKILLed (align/lifecycle.py)
    watchdog = None if args.ray_address else watch_ray_session(context.address_info["session_dir"])
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        num_gpus = args.num_gpus if args.num_gpus is not None else (1.0 if settings.backend == "vllm" else 0.0)
        app = serve_application(settings, num_replicas=args.num_replicas, max_ongoing_requests=args.max_ongoing_requests,
                                num_cpus=args.num_cpus, num_gpus=num_gpus)
        serve.run(app, name="align", route_prefix="/")
        print(f"align.serve: serving {settings.name()!r} at http://{args.host}:{args.port}/v1 (Ray Serve)", flush=True)
        _wait_for_signal()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if watchdog is not None:
                watchdog.release()


def run_uvicorn(settings: ServeSettings, args: argparse.Namespace) -> None:
    """The same app in this process with uvicorn, no Ray (a laptop, a quick check)."""
    import uvicorn

    app = create_app(CompletionService.from_settings(settings))
    print(f"align.serve: serving {settings.name()!r} at http://{args.host}:{args.port}/v1 (uvicorn)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m align.serve", description="OpenAI-compatible API over an align model.")
    p.add_argument("--model", required=True, help="a Hugging Face model folder or hub id")
    p.add_argument("--served-model-name", default="", help="the `model` clients pass (default: the folder name)")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="hf backend: cpu, cuda, auto")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-n", type=int, default=16)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; the API has no auth)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-ray", action="store_true", help="serve with plain uvicorn in this process")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local Ray)")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--max-ongoing-requests", type=int, default=32, help="per replica; beyond it Serve queues")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 for vllm, else 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = ServeSettings(model=args.model, served_name=args.served_model_name, backend=args.backend,
                             dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_n=args.max_n)
    (run_uvicorn if args.no_ray else run_ray)(settings, args)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this `__main__` copy: Ray pickles functions and classes
    # of `__main__` by value, without the module globals that FastAPI needs to resolve the
    # request models, so the replica must get them by reference from `align.serve`.
    from align.serve import main as _main

    sys.exit(_main())
