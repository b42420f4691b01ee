"""The gateway in-process, in front of a fake vLLM: the real ``AntidistillationMiddleware`` driven
over ASGI, with a small downstream app standing in for vLLM's OpenAI server. No engine starts, so
the tests that use this are ``unit`` (tests/conftest.py) and take milliseconds each.

- ``FakeVllm`` answers the routes the gateway exposes the way vLLM does (JSON completions and chat
  with ``usage``; SSE streams of ``data:`` chunks, each with its running ``usage`` when
  ``stream_options.continuous_usage_stats`` is set, the final usage event when ``include_usage``
  is, and ``data: [DONE]``) and records what it received (``Received``: the canonical JSON body the
  gateway forwarded, its ``vllm_xargs`` and ticket). ``on_token`` runs before each output token is
  produced, where the worker writes a failing row's ledger record (before the token is sampled).
- ``ServedApp`` is vLLM's FastAPI app around the middleware: Starlette puts the app in
  ``scope["app"]``, where the gateway reads the served model's ``max_model_len``
  (server/gateway/body.py ``served_max_model_len``).
- ``open_gateway`` writes a tiers file (one fresh key per entry of ``keys``), a failure ledger and
  an audit file under a directory, and builds the middleware from a ``GatewayConfig``.
- ``Gateway.request`` sends one request through httpx's ``ASGITransport``; ``raw`` drives the
  ASGI callables directly where the test needs byte-level control (chunked bodies, a client that
  disconnects, a declared length that is never sent).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import yaml
from antidistill.proxy_worker.runtime.failure_ledger import FailureLedger, create
from antidistill.server.gateway.config import GatewayConfig
from antidistill.server.gateway.middleware import AntidistillationMiddleware
from antidistill.server.tiers import new_key

MAX_MODEL_LEN = 256
MODEL = "tiny-teacher"
METRICS_KEY = "m" * 40
METRICS_BODY = b"# HELP antidistill_requests_total Requests.\nantidistill_requests_total 0\n"
PROMPT_TOKENS = 7  # what the fake reports as every prompt's length
DEFAULT_TOKENS = 8  # output tokens when the request sets no limit
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
AUDIT_LOGGER = "antidistill.server.audit"  # server/gateway/accounting.py writes one JSON line per request here


def token(i: int) -> str:
    """The fake's i-th output token: raw teacher text, which a refused request must never show."""
    return f" raw{i}"


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "The sum of 12", "max_tokens": 4, "temperature": 0, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Alice has 3 apples"}]
    return {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0, **fields}


# --- the fake downstream ---------------------------------------------------------------------------


@dataclass
class Received:
    """One request as vLLM's app got it from the gateway."""

    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    raw: bytes = b""
    complete: bool = True  # its body ended (more_body false) rather than with a disconnect
    aborted: bool = False  # its receive channel reported a disconnect while it ran: vLLM aborts it
    sent: int = 0  # output tokens it sent

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.raw)

    @property
    def xargs(self) -> dict[str, Any]:
        return self.body.get("vllm_xargs") or {}

    @property
    def ticket(self) -> int | None:
        return self.xargs.get("ad_ticket")

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]


Hook = Callable[[Received, int], Awaitable[None] | None]


class FakeVllm:
    """vLLM's OpenAI router, reduced to the exposed routes; see the module docstring."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.on_token: Hook | None = None  # before output token i of a request is produced
        self.hold: asyncio.Event | None = None  # set: generation waits for it (in-flight requests)
        self.arrived: asyncio.Event | None = None  # set by a generation request on arrival

    def reset(self) -> None:
        self.received.clear()
        self.on_token = self.hold = self.arrived = None

    def generated(self) -> list[Received]:
        return [r for r in self.received if r.path in (COMPLETIONS, CHAT)]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        assert scope["type"] == "http", scope["type"]
        rec = Received(scope["method"], scope["path"], list(scope["headers"]))
        self.received.append(rec)
        path = scope["path"]
        if path in (COMPLETIONS, CHAT) and scope["method"] == "POST":
            return await self._generate(rec, receive, send)
        if path in ("/health", "/ping"):
            return await _respond(send, 200, b"", b"text/plain")
        if path == "/metrics":
            return await _respond(send, 200, METRICS_BODY, b"text/plain; version=0.0.4")
        if path == "/v1/models":
            models = {"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": MAX_MODEL_LEN}]}
            return await _respond(send, 200, json.dumps(models).encode())
        if path == "/version":
            return await _respond(send, 200, b'{"version": "0.0.0-fake"}')
        if path in (COMPLETIONS, CHAT):
            return await _respond(send, 405, b'{"detail": "Method Not Allowed"}')
        await _respond(send, 404, b'{"detail": "Not Found"}')

    async def _generate(self, rec: Received, receive: Callable, send: Callable) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                rec.complete = False
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        rec.raw = b"".join(chunks)
        if not rec.complete:
            return
        if self.arrived is not None:
            self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        body = rec.body
        disconnected = asyncio.Event()

        async def listen() -> None:  # vLLM aborts a request whose client went away
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        listener = asyncio.get_running_loop().create_task(listen())
        try:
            if body.get("stream"):
                await self._stream(rec, body, send, disconnected)
            else:
                await self._json(rec, body, send, disconnected)
        finally:
            listener.cancel()
        rec.aborted = rec.aborted or disconnected.is_set()

    async def _step(self, rec: Received, i: int, disconnected: asyncio.Event) -> bool:
        """One engine step before token ``i``: the worker's hook, then a yield; False once aborted."""
        if self.on_token is not None:
            done = self.on_token(rec, i)
            if done is not None:
                await done
        await asyncio.sleep(0.001)
        if disconnected.is_set():
            rec.aborted = True
            return False
        return True

    async def _json(self, rec: Received, body: dict, send: Callable, disconnected: asyncio.Event) -> None:
        n = output_tokens(rec.path, body)
        text = ""
        for i in range(n):
            if not await self._step(rec, i, disconnected):
                return  # vLLM cancels the handler: nothing is sent
            text += token(i)
            rec.sent += 1
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}
        if rec.path == CHAT:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": "length"}
            out = {"id": "chatcmpl-fake", "object": "chat.completion", "model": MODEL, "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
            out = {"id": "cmpl-fake", "object": "text_completion", "model": MODEL, "choices": [choice]}
        await _respond(send, 200, json.dumps({**out, "usage": usage}).encode())

    async def _stream(self, rec: Received, body: dict, send: Callable, disconnected: asyncio.Event) -> None:
        n = output_tokens(rec.path, body)
        options = body.get("stream_options") or {}
        running = bool(options.get("include_usage") and options.get("continuous_usage_stats"))
        start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
        await send(start)
        chat_route = rec.path == CHAT
        kind = "chat.completion.chunk" if chat_route else "text_completion"
        head = {"id": "fake", "object": kind, "model": MODEL}

        async def event(data: dict | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            await send({"type": "http.response.body", "body": f"data: {text}\n\n".encode(), "more_body": True})

        def usage(done: int) -> dict:
            return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": done, "total_tokens": PROMPT_TOKENS + done}

        if chat_route:  # vLLM's first chat chunk names the role
            first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            await event({**first, "usage": usage(0)} if running else first)
        for i in range(n):
            if not await self._step(rec, i, disconnected):
                return  # aborted: the stream stops (the client is gone)
            last = "length" if i == n - 1 else None
            if chat_route:
                choice = {"index": 0, "delta": {"content": token(i)}, "finish_reason": last}
            else:
                choice = {"index": 0, "text": token(i), "logprobs": None, "finish_reason": last}
            chunk = {**head, "choices": [choice]}
            await event({**chunk, "usage": usage(i + 1)} if running else chunk)
            rec.sent += 1
        if options.get("include_usage"):
            await event({**head, "choices": [], "usage": usage(n)})
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def output_tokens(path: str, body: dict) -> int:
    names = ("max_completion_tokens", "max_tokens") if path == CHAT else ("max_tokens",)
    return next((int(body[name]) for name in names if body.get(name) is not None), DEFAULT_TOKENS)


async def _respond(send: Callable, status: int, body: bytes, kind: bytes = b"application/json") -> None:
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ServedApp:
    """vLLM's FastAPI app with the gateway as its middleware: Starlette sets ``scope["app"]`` to the
    app before its middleware stack runs, and vLLM keeps its config on ``app.state``."""

    def __init__(self, middleware: Callable, max_model_len: int | None = MAX_MODEL_LEN) -> None:
        self.middleware = middleware
        model_config = SimpleNamespace(max_model_len=max_model_len)
        self.state = SimpleNamespace(vllm_config=SimpleNamespace(model_config=model_config))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        await self.middleware({**scope, "app": self}, receive, send)


# --- the gateway ------------------------------------------------------------------------------


class AuditTap(logging.Handler):
    """The audit lines, as written: the audit logger is the process's (the first gateway built in
    it opens the file), so every gateway of a test session is read here."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@dataclass
class Raw:
    """What the middleware sent for one raw ASGI call, and how much of the request it read."""

    messages: list[dict[str, Any]]
    reads: int  # receive() calls that returned a body chunk or a disconnect

    @property
    def status(self) -> int:
        return self.messages[0]["status"]

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0].get("headers", []))

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Gateway:
    middleware: AntidistillationMiddleware
    fake: FakeVllm
    keys: dict[str, str]  # key name → API key
    ledger: FailureLedger  # the worker's view: write records here
    tap: AuditTap
    app: ServedApp = field(init=False)

    def __post_init__(self) -> None:
        self.app = ServedApp(self.middleware)

    def auth(self, name: str | None) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.keys[name]}")] if name else []

    def request(self, method: str, path: str, name: str | None = None, **kw: Any) -> httpx.Response:
        return asyncio.run(self.arequest(method, path, name, **kw))

    def post(self, name: str | None, body: dict | bytes, path: str | None = None, **kw: Any) -> httpx.Response:
        path = path or (CHAT if isinstance(body, dict) and "messages" in body else COMPLETIONS)
        return self.request("POST", path, name, body=body, **kw)

    async def arequest(
        self,
        method: str,
        path: str,
        name: str | None = None,
        *,
        body: dict | bytes | None = None,
        headers: Iterable[tuple[str, str]] = (),
        params: Mapping[str, str] | None = None,
        app: Callable | None = None,
    ) -> httpx.Response:
        content = json.dumps(body).encode() if isinstance(body, dict) else body
        hdrs = [*self.auth(name), *headers]
        if content is not None:
            hdrs.append(("content-type", "application/json"))
        transport = httpx.ASGITransport(app=app or self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.request(method, path, content=content, headers=hdrs, params=params, timeout=10)

    def raw(
        self,
        path: str,
        chunks: Iterable[dict[str, Any]] | AsyncIterator[dict[str, Any]] = (),
        headers: Iterable[tuple[bytes, bytes]] = (),
        *,
        name: str | None = None,
        kind: str = "http",
        method: str = "POST",
    ) -> Raw:
        """One ASGI call with the receive messages ``chunks`` (then a disconnect, as uvicorn reports a
        client gone); the messages sent and how many receive() calls the middleware made."""
        return asyncio.run(asyncio.wait_for(self._raw(path, chunks, headers, name, kind, method), 10))

    async def _raw(self, path, chunks, headers, name, kind, method) -> Raw:
        auth = [(k.encode(), v.encode()) for k, v in self.auth(name)]
        scope = {
            "type": kind,
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http" if kind == "http" else "ws",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [*auth, *headers],
            "client": ("127.0.0.1", 1234),
            "server": ("gateway", 80),
        }
        source = chunks if hasattr(chunks, "__anext__") else _aiter(chunks)
        sent: list[dict[str, Any]] = []
        reads = 0

        async def receive() -> dict[str, Any]:
            nonlocal reads
            reads += 1
            try:
                return await source.__anext__()
            except StopAsyncIteration:
                await asyncio.sleep(0.05)  # an ended request waits; then the client is gone
                return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        return Raw(sent, reads)

    def audit(self, since: int = 0) -> list[dict[str, Any]]:
        return self.tap.lines[since:]

    def last_audit(self) -> dict[str, Any]:
        assert self.tap.lines, "no audit line"
        return self.tap.lines[-1]


async def _aiter(items: Iterable[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


def write_tiers(path: Path, tiers: dict, keys: Mapping[str, Mapping[str, Any]], accounts: dict | None = None):
    """A tiers file; ``keys`` is key name → its entry (``tier``, optional ``account``, ``revoked``).
    Returns key name → API key (only the hashes are in the file)."""
    made, entries = {}, []
    for name, entry in keys.items():
        made[name], digest = new_key()
        entries.append({"sha256": digest, "name": name, **entry})
    path.write_text(yaml.safe_dump({"tiers": tiers, "keys": entries, "accounts": accounts or {}}, allow_unicode=True))
    return made


@contextmanager
def open_gateway(
    root: Path,
    tiers: dict,
    keys: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    accounts: dict | None = None,
    ledger_records: int = 64,
    **config: Any,
) -> Iterator[Gateway]:
    """The middleware over a fresh ``FakeVllm``, its tiers file, failure ledger and audit file under
    ``root``; one key per tier unless ``keys`` names them. SIGHUP's handler (the gateway installs
    its reload there) and the audit tap are undone on exit."""
    keys = keys if keys is not None else {name: {"tier": name} for name in tiers}
    made = write_tiers(root / "tiers.yaml", tiers, keys, accounts)
    ledger_path = create(root / "ledger.bin", ledger_records)
    gateway_config = GatewayConfig(
        tiers=root / "tiers.yaml",
        ledger=ledger_path,
        audit_log=str(root / "audit.jsonl"),
        metrics_key=METRICS_KEY,
        **config,
    )
    previous = signal.getsignal(signal.SIGHUP)
    tap = AuditTap()
    logger = logging.getLogger(AUDIT_LOGGER)
    fake = FakeVllm()
    try:
        middleware = AntidistillationMiddleware(fake, gateway_config)
        logger.addHandler(tap)
        worker = FailureLedger(ledger_path)
        try:
            yield Gateway(middleware, fake, made, worker, tap)
        finally:
            worker.close()
    finally:
        logger.removeHandler(tap)
        signal.signal(signal.SIGHUP, previous)


def sse(text: str) -> list[dict | str]:
    """A stream's ``data:`` events in order: JSON objects, ``"[DONE]"``, and comments as ``": …"``."""
    out: list[dict | str] = []
    for event in text.split("\n\n"):
        if event.startswith("data: [DONE]"):
            out.append("[DONE]")
        elif event.startswith("data: "):
            out.append(json.loads(event[6:]))
        elif event.startswith(":"):
            out.append(event)
    return out


def error(res: httpx.Response | Raw) -> dict[str, Any]:
    """The OpenAI-style error object of a refusal."""
    return res.json()["error"]
