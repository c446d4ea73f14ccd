"""Client endpoints: OpenAI-compatible completions (with SSE streaming), models, cluster, health,
metrics. Bearer-token authenticated except /healthz; every bad request is a 4xx with a reason.

Roles: the inference token (`api_token`) opens the client routes; the administrative routes
(POST /v1/cluster/migrate: re-placement and the operator's member set) need `admin_token`, and
the inference token gets 403 there. The admin token also opens the client routes (an operator's
CLI reads /v1/cluster with it). A node that listens beyond loopback refuses to start without
both tokens (startup.check_exposure), so an unset token only happens on a loopback-only node;
there, an unset api_token leaves the client routes open to local processes, and an unset
admin_token lets the admin routes take the inference token (or none when that is unset too),
from loopback peers only, so a reverse proxy on another address cannot lend them out.

While this node loads its model, a ready peer answers its completions (`delegation.py`; the
peer's side is `generate_for_peer`, a signed peer route).

A generation is admitted only while the node has a free slot (engine.MAX_ADMITTED; else 429 with
Retry-After) and is cancelled when its client goes away, streamed or not: the connection is
watched while the answer is computed, and the worker stops at its next token.

No request hangs: a generation that makes no progress (no token) for `STALL_S` is cancelled
and answered 504, and experts that no peer could compute (`remote.ExpertsUnavailable`, a
`PeerError`) are a 503 with Retry-After: a peer's failure is never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edgemoe.daemon import delegation, diagnosis
from edgemoe.daemon.peer_api import DAEMON_KEY, Call, Reply, authenticated, error
from edgemoe.daemon.peers import ExpertsUnavailable, PeerError
from edgemoe.daemon.startup import is_loopback
from edgemoe.daemon.wire import SEAL_OVERHEAD, WireError, pack, unpack
from edgemoe.model.generation import Busy, GenerationParams, GenerationResult

if TYPE_CHECKING:
    from edgemoe.daemon.node import Daemon

log = logging.getLogger(__name__)
MAX_CLIENT_BODY = 1 << 20
MAX_PROMPT_TOKENS = 4096
MAX_NEW_TOKENS = 2048
# Below this a temperature divides the logits into infinities (NaN probabilities): use 0 (greedy).
MIN_TEMPERATURE = 1e-3
MAX_SEED = 2**63 - 1  # torch's generator seed is a 64-bit integer
# Seconds a client may take to send its whole body once its headers are in.
BODY_TIMEOUT_S = 30.0
# How often a generation's connection is checked for a client that went away (seconds); a
# cancelled generation still runs until the check and then its current token.
DISCONNECT_POLL_S = 0.1
# Seconds a generation may go without a new token (the first one included) before it is
# cancelled and answered 504: every remote call is bounded (remote.CALL_BUDGET_S), so this
# only ends a step that is stuck for a reason nobody bounded.
STALL_S = 25.0
STALL_CHECK_S = 0.5  # how often a whole (not streamed) answer's progress is looked at
# Failures of peers, not of this node: answered 503 with Retry-After.
PEER_FAILURES = (ExpertsUnavailable, PeerError)
UNAVAILABLE_RETRY_S = 1


class BadRequest(Exception):
    def __init__(
        self, reason: str, status: int = 400, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.headers = headers or {}


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON_KEY]  # type: ignore[return-value]


def _bearer(request: web.Request) -> bytes | None:
    """The bearer token's bytes as sent (any bytes: the header is not trusted to be text)."""
    got = request.headers.get("Authorization", "")
    if not got.startswith("Bearer "):
        return None
    try:  # aiohttp keeps undecodable header bytes as surrogate escapes
        return got[7:].encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return b""


def _matches(got: bytes | None, token: str | None) -> bool:
    if got is None or not token:
        return False
    return hmac.compare_digest(got, token.encode())


def _check_token(request: web.Request, *, admin: bool) -> None:
    """The module docstring's roles: 401 without a valid token, 403 for the wrong role."""
    cfg = _daemon(request).config
    if cfg.tls_cert and not request.secure and not is_loopback(request.remote or ""):
        raise BadRequest("this node serves its client API over HTTPS only (plain HTTP is for "
                         "its peers and local clients)", 403)  # fmt: skip
    got = _bearer(request)
    if admin and cfg.admin_token:
        if _matches(got, cfg.admin_token):
            return
        if _matches(got, cfg.api_token):
            raise BadRequest("this route needs the admin token; the API token does not grant it",
                             403)  # fmt: skip
        raise BadRequest("missing or wrong admin token (Authorization: Bearer ...)", 401)
    if admin and not is_loopback(request.remote or ""):
        raise BadRequest("admin routes of a node without admin_token serve loopback clients only",
                         403)  # fmt: skip
    if cfg.api_token and not (_matches(got, cfg.api_token) or _matches(got, cfg.admin_token)):
        raise BadRequest("missing or wrong API token (Authorization: Bearer ...)", 401)


async def _read_body(request: web.Request) -> bytes:
    """The whole body, at most MAX_CLIENT_BODY bytes and BODY_TIMEOUT_S seconds."""
    too_big = BadRequest(f"body exceeds {MAX_CLIENT_BODY} bytes", 413)
    if request.content_length is not None and request.content_length > MAX_CLIENT_BODY:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > MAX_CLIENT_BODY:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(f"body not received within {BODY_TIMEOUT_S:.0f} s", 408) from None
    return b"".join(chunks)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await _read_body(request)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("body nests too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _text(value: str, what: str) -> str:
    """A string the tokenizer can take: JSON lets through lone surrogates, UTF-8 does not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} contains an unpaired surrogate (invalid Unicode)") from None
    return value


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be a number in [{lo}, {hi}]")
    return float(value)


def _params(body: dict[str, Any]) -> GenerationParams:
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
    if max_tokens is None:
        max_tokens = 16
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise BadRequest("max_tokens must be an integer")
    if not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise BadRequest(f"max_tokens must be in 1..{MAX_NEW_TOKENS}")
    n = body.get("n", 1)
    if n not in (1, None):
        raise BadRequest("only n = 1 is supported")
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
    ):
        raise BadRequest(f"seed must be an integer in [0, {MAX_SEED}]")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise BadRequest(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2.0]")
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        seed=seed,
        min_tokens=_min_tokens(body, max_tokens),
    )


def _min_tokens(body: dict[str, Any], max_tokens: int) -> int:
    """vLLM's `min_tokens` and `ignore_eos` (= min_tokens max_tokens): replayed requests run
    their whole recorded length whatever tokens come out."""
    ignore = body.get("ignore_eos", False)
    if ignore is not None and not isinstance(ignore, bool):
        raise BadRequest("ignore_eos must be true or false")
    value = body.get("min_tokens", 0)
    if value is None:
        value = 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= max_tokens:
        raise BadRequest(f"min_tokens must be an integer in 0..max_tokens ({max_tokens})")
    return max_tokens if ignore else value


def _check_model(d: Daemon, body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        return d.model_id
    if not isinstance(model, str) or model not in (d.model_id, "edgemoe"):
        raise BadRequest(f"unknown model {model!r}; this cluster serves {d.model_id!r}", 404)
    return d.model_id


def _prompt_ids(d: Daemon, body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    engine = d.engine
    assert engine is not None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = engine.encode(_text(prompt, "prompt"))
    elif isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        vocab = len(engine.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise BadRequest(f"prompt token ids must be in 0..{vocab - 1}")
        ids = list(prompt)
    else:
        raise BadRequest("prompt must be a string or a list of token ids")
    if not ids:
        raise BadRequest("prompt is empty")
    if len(ids) > MAX_PROMPT_TOKENS:
        raise BadRequest(f"prompt has {len(ids)} tokens, the limit is {MAX_PROMPT_TOKENS}", 413)
    return ids


def _chat_ids(d: Daemon, body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadRequest("each message needs a string content")
        if m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest("message role must be system, user or assistant")
        clean.append({"role": m["role"], "content": _text(m["content"], "message content")})
    assert d.engine is not None
    ids = d.engine.chat_prompt(clean)
    if len(ids) > MAX_PROMPT_TOKENS:
        raise BadRequest(f"prompt has {len(ids)} tokens, the limit is {MAX_PROMPT_TOKENS}", 413)
    return ids


def _usage(result: GenerationResult) -> dict[str, int]:
    n = len(result.token_ids)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": result.prompt_tokens + n,
    }


def _guard(handler=None, *, admin: bool = False):  # type: ignore[no-untyped-def]
    """Token check (the admin role with ``admin=True``), and BadRequest -> JSON 4xx for a
    client handler."""
    if handler is None:
        return lambda h: _guard(h, admin=admin)

    async def wrapped(request: web.Request) -> web.StreamResponse:
        d = _daemon(request)
        status = 500
        try:
            _check_token(request, admin=admin)
            response = await handler(request)
            status = response.status
            return response
        except BadRequest as exc:
            status = exc.status
            response = error(exc.status, str(exc))
            response.headers.update(exc.headers)
            return response
        except (web.HTTPException, ConnectionError):  # aiohttp's own answers; client gone
            raise
        except PEER_FAILURES as exc:
            status = 503
            response = error(503, f"peers could not compute this request: {exc}")
            response.headers["Retry-After"] = str(UNAVAILABLE_RETRY_S)
            return response
        except Exception as exc:  # one failing request never takes the daemon down
            log.exception("%s failed", handler.__name__)
            return error(500, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            d.metrics.requests.labels(endpoint=handler.__name__, status=str(status)).inc()

    wrapped.__name__ = handler.__name__
    return wrapped


@_guard
async def models(request: web.Request) -> web.StreamResponse:
    d = _daemon(request)
    if d.store.manifest is None:
        raise BadRequest("this node has no model yet", 503)
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"id": d.model_id, "object": "model", "created": d.started, "owned_by": "edgemoe"}
            ],
        }
    )


@dataclass(frozen=True)
class _Job:
    """A completion request that passed every check, with its answer's identity."""

    ids: list[int]
    params: GenerationParams
    chat: bool
    model: str
    rid: str
    created: int


def _job(d: Daemon, body: dict[str, Any], chat: bool) -> _Job:
    model = _check_model(d, body)
    params = _params(body)
    ids = _chat_ids(d, body) if chat else _prompt_ids(d, body)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    return _Job(ids, params, chat, model, rid, int(time.time()))


def _admit(d: Daemon) -> Any:
    assert d.engine is not None
    try:
        return d.engine.admit()
    except Busy as exc:
        d.metrics.busy.inc()
        raise BadRequest(str(exc), 429, {"Retry-After": str(exc.retry_after)}) from None


async def _completion(request: web.Request, chat: bool) -> web.StreamResponse:
    d = _daemon(request)
    body = await _json_body(request)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    if d.engine is None:
        return await _delegated(request, d, body, chat=chat, stream=stream)
    job = _job(d, body, chat)
    with _admit(d), _watching(request) as cancel:
        if stream:
            return await _streamed(request, d, job, cancel)
        result = await _generate(d, job.ids, job.params, cancel)
        if result.finish_reason == "cancelled":  # nobody is left to read an answer
            raise BadRequest("the client closed the connection", 499)
        return web.json_response(_whole(d, job, result))


async def _watch_client(request: web.Request, cancel: threading.Event) -> None:
    """Set `cancel` once the request's connection is gone (aiohttp does not cancel handlers)."""
    while (transport := request.transport) is not None and not transport.is_closing():
        await asyncio.sleep(DISCONNECT_POLL_S)
    cancel.set()


@contextlib.contextmanager
def _watching(request: web.Request) -> Iterator[threading.Event]:
    """A cancel flag for the request's generation, set once its connection is gone."""
    cancel = threading.Event()
    watch = asyncio.ensure_future(_watch_client(request, cancel))
    try:
        yield cancel
    finally:
        watch.cancel()


def _whole(d: Daemon, job: _Job, result: GenerationResult) -> dict[str, Any]:
    """The answer of a request that did not ask to stream."""
    choice: dict[str, Any] = {
        "index": 0,
        "finish_reason": result.finish_reason,
        "token_ids": result.token_ids,
    }
    if job.chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice.update(text=result.text, logprobs=None)
    return {
        "id": job.rid,
        "object": "chat.completion" if job.chat else "text_completion",
        "created": job.created,
        "model": job.model,
        "node_id": d.node_id,
        "choices": [choice],
        "usage": _usage(result),
    }


class _Events:
    """A streamed answer: OpenAI's chunk objects as server-sent events, then [DONE]."""

    def __init__(self, request: web.Request, *, chat: bool, rid: str, created: int,
                 model: str, node_id: str) -> None:  # fmt: skip
        self.request, self.chat = request, chat
        self.head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model}  # fmt: skip
        self.node_id = node_id
        self.resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )

    async def start(self) -> None:
        await self.resp.prepare(self.request)
        if self.chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""},
                     "finish_reason": None}  # fmt: skip
            await self._write({**self.head, "choices": [first]})

    async def send(self, delta: str, tok: list[int], finish: str | None) -> None:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": tok}
        if self.chat:
            choice["delta"] = {"content": delta} if finish is None else {}
        else:
            choice.update(text=delta, logprobs=None)
        await self._write({**self.head, "node_id": self.node_id, "choices": [choice]})

    async def error(self, message: str, code: int) -> None:
        """A failure after the headers went out goes into the stream."""
        await self._write({"error": {"message": message, "code": code}})

    async def finish(self) -> web.StreamResponse:
        await self.resp.write(b"data: [DONE]\n\n")
        await self.resp.write_eof()
        return self.resp

    async def _write(self, event: dict[str, Any]) -> None:
        await self.resp.write(f"data: {json.dumps(event)}\n\n".encode())


async def _streamed(request: web.Request, d: Daemon, job: _Job,
                    cancel: threading.Event) -> web.StreamResponse:  # fmt: skip
    assert d.engine is not None
    events = _Events(request, chat=job.chat, rid=job.rid, created=job.created, model=job.model,
                     node_id=d.node_id)  # fmt: skip
    await events.start()
    done: list[GenerationResult] = []
    produced: list[int] = []
    text_so_far = ""
    tokens = d.stream(job.ids, job.params, done.append, cancel)
    try:
        async with contextlib.aclosing(tokens):  # closing it stops the generation
            async for tok in _progressing(tokens, cancel):
                produced.append(tok)
                text = d.engine.decode(produced)
                # hold back a trailing replacement char: it may be half of a multi-byte character
                stable = text.rstrip("\ufffd") if text.startswith(text_so_far) else text
                delta = stable[len(text_so_far) :] if stable.startswith(text_so_far) else ""
                text_so_far += delta
                await events.send(delta, [tok], None)
        rest = d.engine.decode(produced)[len(text_so_far) :]
        if rest:
            await events.send(rest, [], None)
        await events.send("", [], done[0].finish_reason if done else "length")
    except ConnectionError:  # the client went away: nothing left to tell it
        return events.resp
    except BadRequest as exc:  # stalled: headers are out, the error goes into the stream
        await events.error(str(exc), exc.status)
    except PEER_FAILURES as exc:
        await events.error(f"peers could not compute this request: {exc}", 503)
    except Exception as exc:  # headers are out: the failure goes into the stream
        log.exception("streamed generation failed")
        await events.error(f"{type(exc).__name__}: {exc}", 500)
    return await events.finish()


# ---- while this node loads: a peer answers (delegation.py) ------------------------------------


async def _delegated(request: web.Request, d: Daemon, body: dict[str, Any], *, chat: bool,
                     stream: bool) -> web.StreamResponse:  # fmt: skip
    """This node has no model in memory yet: a ready peer computes the answer, which is
    passed on (streamed requests get it as one chunk)."""
    try:
        pack(body)
    except (OverflowError, TypeError, ValueError) as exc:
        raise BadRequest(f"body cannot be passed to a peer: {exc}") from None
    ask = asyncio.ensure_future(d.delegation.ask(d.sources(), chat, {**body, "stream": False}))
    gone = asyncio.ensure_future(_watch_client(request, threading.Event()))
    try:
        await asyncio.wait({ask, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not ask.done():
            ask.cancel()
    if ask.cancelled():
        raise BadRequest("the client closed the connection", 499)
    reply = ask.result()
    if reply is None:
        raise BadRequest("this node is still loading the model and no peer could answer for "
                         "it; retry shortly", 503,
                         {"Retry-After": str(UNAVAILABLE_RETRY_S)})  # fmt: skip
    answer, status = reply["answer"], reply["status"]
    if status != 200:
        refusal = answer.get("error")
        message = refusal.get("message") if isinstance(refusal, dict) else None
        raise BadRequest(str(message or "refused by the peer"),
                         status if 400 <= status < 500 else 502)  # fmt: skip
    d.metrics.delegated.inc()
    if not stream:
        return web.json_response(answer)
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        events = _Events(request, chat=chat, rid=answer["id"], created=answer["created"],
                         model=answer["model"], node_id=answer["node_id"])  # fmt: skip
        tokens, finish = list(choice["token_ids"]), choice["finish_reason"]
    except (KeyError, IndexError, TypeError) as exc:
        raise BadRequest(f"the peer's answer is malformed ({exc!r})", 502) from None
    await events.start()
    await events.send(str(text), tokens, None)
    await events.send("", [], finish)
    return await events.finish()


async def generate_for_peer(request: web.Request, call: Call) -> Reply:
    """A loading peer's client's completion (`delegation`), checked and computed as if asked
    here, answered whole: {"status", "answer"}. The request's own faults are answered (the
    same anywhere); a reason to ask another peer (loading, busy, stuck) is an HTTP error."""
    d = _daemon(request)
    if d.engine is None:
        raise WireError("this node is still loading the model", 503)
    req = unpack(call.body)
    if not (isinstance(req, dict) and isinstance(req.get("chat"), bool)
            and isinstance(req.get("body"), dict)):  # fmt: skip
        raise WireError("a delegated completion needs chat (a bool) and body (an object)")
    try:
        job = _job(d, req["body"], req["chat"])
        slot = _admit(d)
    except BadRequest as exc:
        if exc.status == 429:
            raise WireError(str(exc), 429) from None
        refused = {"error": {"message": str(exc), "code": exc.status}}
        return Reply(200, pack({"status": exc.status, "answer": refused}))
    with slot, _watching(request) as cancel:
        try:
            result = await _generate(d, job.ids, job.params, cancel)
        except BadRequest as exc:  # stalled
            raise WireError(str(exc), exc.status) from None
        except PEER_FAILURES as exc:
            raise WireError(f"peers could not compute this request: {exc}", 503) from None
    if result.finish_reason == "cancelled":
        raise WireError("the asking peer closed the connection", 499)
    d.metrics.generated_for_peers.inc()
    return Reply(200, pack({"status": 200, "answer": _whole(d, job, result)}))


def _delegated_limit(d: Daemon) -> int:
    """msgpack of a client body: at most ~2.3x its JSON (a float as "0," is 9 bytes)."""
    return 3 * MAX_CLIENT_BODY + SEAL_OVERHEAD + 4096


def _stalled(cancel: threading.Event) -> BadRequest:
    cancel.set()
    return BadRequest(f"the generation made no progress for {STALL_S:g} s (peers unreachable "
                      "or overloaded); retry", 504)  # fmt: skip


async def _progressing(tokens: AsyncIterator[int], cancel: threading.Event
                       ) -> AsyncIterator[int]:  # fmt: skip
    """`tokens`, each within STALL_S of the one before (the first of the start); else the
    generation is cancelled and the request ends with a 504."""
    while True:
        try:
            async with asyncio.timeout(STALL_S):
                tok = await anext(tokens)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _stalled(cancel) from None
        yield tok


async def _generate(d: Daemon, ids: list[int], params: GenerationParams,
                    cancel: threading.Event) -> GenerationResult:  # fmt: skip
    """The whole answer, under the same progress deadline as a streamed one. The model's
    thread only stamps each token's time and the loop looks every `STALL_CHECK_S`: no wake-up
    of the event loop per token (a streamed answer needs one; this one does not)."""
    last = [time.monotonic()]

    def tick(_: int) -> None:
        last[0] = time.monotonic()

    answer = asyncio.ensure_future(d.generate(ids, params, cancel, tick))
    try:
        while not answer.done():
            await asyncio.wait({answer}, timeout=STALL_CHECK_S)
            if not answer.done() and time.monotonic() - last[0] > STALL_S:
                raise _stalled(cancel)
    except BaseException:
        cancel.set()  # the generation ends at its next step; its result is for nobody
        answer.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise
    return answer.result()


@_guard
async def completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=False)


@_guard
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=True)


@_guard
async def cluster(request: web.Request) -> web.StreamResponse:
    d, view = _daemon(request), _daemon(request).cluster_view()
    return web.json_response({**view, "warnings": diagnosis.node_warnings(d, view)})


@_guard(admin=True)
async def migrate(request: web.Request) -> web.StreamResponse:
    d = _daemon(request)
    body = await _json_body(request)
    dry_run = body.get("dry_run", False)
    members = body.get("members")
    if not isinstance(dry_run, bool):
        raise BadRequest("dry_run must be true or false")
    if members is not None and (
        not isinstance(members, list) or not all(isinstance(m, str) for m in members)
    ):
        raise BadRequest("members must be null or a list of node ids")
    try:
        result = await d.request_migration(dry_run=dry_run, members=members)
    except ValueError as exc:
        raise BadRequest(str(exc), 409) from None
    return web.json_response(result)


@_guard
async def metrics(request: web.Request) -> web.StreamResponse:
    d = _daemon(request)
    return web.Response(body=d.metrics.render(), headers={"Content-Type": d.metrics.content_type})


async def healthz(request: web.Request) -> web.StreamResponse:
    d = _daemon(request)
    ready, state = d.readiness()
    return web.json_response(
        {"ok": True, "node_id": d.node_id, "ready": ready, "state": state,
         "tasks": _task_health(d)}
    )  # fmt: skip


def _task_health(d: Daemon) -> dict[str, Any]:
    """Supervised tasks that failed (logged, counted and restarted): {"failed": {name: ...}}."""
    return {"failed": d.supervisor.failed()}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/cluster", cluster)
    app.router.add_post("/v1/cluster/migrate", migrate)
    app.router.add_post(delegation.PATH, authenticated(generate_for_peer, _delegated_limit))
