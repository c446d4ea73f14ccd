"""Client endpoints: OpenAI-compatible completions (with SSE streaming), models, cluster, health,
metrics. Bearer-token authenticated except /healthz; every bad request is a 4xx with a reason.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edgemoe.daemon import diagnosis
from edgemoe.daemon.engine import GenerationParams, GenerationResult
from edgemoe.daemon.peer_api import DAEMON_KEY, error

if TYPE_CHECKING:
    from edgemoe.daemon.node import Daemon

log = logging.getLogger(__name__)
MAX_CLIENT_BODY = 1 << 20
MAX_PROMPT_TOKENS = 4096
MAX_NEW_TOKENS = 2048


class BadRequest(Exception):
    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON_KEY]  # type: ignore[return-value]


def _check_token(request: web.Request) -> None:
    token = _daemon(request).config.api_token
    if not token:
        return
    got = request.headers.get("Authorization", "")
    if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), token.encode()):
        raise BadRequest("missing or wrong API token (Authorization: Bearer ...)", 401)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_CLIENT_BODY:
        raise BadRequest(f"body exceeds {MAX_CLIENT_BODY} bytes", 413)
    raw = await request.content.read(MAX_CLIENT_BODY + 1)
    if len(raw) > MAX_CLIENT_BODY:
        raise BadRequest(f"body exceeds {MAX_CLIENT_BODY} bytes", 413)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


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
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed must be an integer")
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        seed=seed,
    )


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
        ids = engine.encode(prompt)
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
        clean.append({"role": m["role"], "content": m["content"]})
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


def _guard(handler):  # type: ignore[no-untyped-def]
    """Token check, readiness, and BadRequest -> JSON 4xx for a client handler."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        d = _daemon(request)
        status = 500
        try:
            _check_token(request)
            response = await handler(request)
            status = response.status
            return response
        except BadRequest as exc:
            status = exc.status
            return error(exc.status, str(exc))
        except (web.HTTPException, ConnectionError):  # aiohttp's own answers; client gone
            raise
        except Exception as exc:  # one failing request never takes the daemon down
            log.exception("%s failed", handler.__name__)
            return error(500, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            d.metrics.requests.labels(endpoint=handler.__name__, status=str(status)).inc()

    wrapped.__name__ = handler.__name__
    return wrapped


def _ready(d: Daemon) -> None:
    if d.engine is None:
        raise BadRequest("this node is still loading the model; retry shortly", 503)


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


async def _completion(request: web.Request, chat: bool) -> web.StreamResponse:
    d = _daemon(request)
    _ready(d)
    body = await _json_body(request)
    model = _check_model(d, body)
    params = _params(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    ids = _chat_ids(d, body) if chat else _prompt_ids(d, body)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    assert d.engine is not None
    if not stream:
        result = await d.generate(ids, params)
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": result.finish_reason,
            "token_ids": result.token_ids,
        }
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice.update(text=result.text, logprobs=None)
        return web.json_response(
            {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model,
                "node_id": d.node_id,
                "choices": [choice],
                "usage": _usage(result),
            }
        )
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    async def send(delta: str, tok: list[int], finish: str | None) -> None:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": tok}
        if chat:
            choice["delta"] = {"content": delta} if finish is None else {}
        else:
            choice.update(text=delta, logprobs=None)
        event = {"id": rid, "object": chunk_kind, "created": created, "model": model,
                 "node_id": d.node_id, "choices": [choice]}  # fmt: skip
        await resp.write(f"data: {json.dumps(event)}\n\n".encode())

    if chat:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        event = {"id": rid, "object": chunk_kind, "created": created, "model": model,
                 "choices": [first]}  # fmt: skip
        await resp.write(f"data: {json.dumps(event)}\n\n".encode())
    done: list[GenerationResult] = []
    produced: list[int] = []
    text_so_far = ""
    tokens = d.stream(ids, params, done.append)
    try:
        async with contextlib.aclosing(tokens):  # closing it stops the generation
            async for tok in tokens:
                produced.append(tok)
                text = d.engine.decode(produced)
                # hold back a trailing replacement char: it may be half of a multi-byte character
                stable = text.rstrip("\ufffd") if text.startswith(text_so_far) else text
                delta = stable[len(text_so_far) :] if stable.startswith(text_so_far) else ""
                text_so_far += delta
                await send(delta, [tok], None)
        rest = d.engine.decode(produced)[len(text_so_far) :]
        if rest:
            await send(rest, [], None)
        await send("", [], done[0].finish_reason if done else "length")
    except ConnectionError:  # the client went away: nothing left to tell it
        return resp
    except Exception as exc:  # headers are out: the failure goes into the stream
        log.exception("streamed generation failed")
        message = {"error": {"message": f"{type(exc).__name__}: {exc}", "code": 500}}
        await resp.write(f"data: {json.dumps(message)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


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


@_guard
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
    return web.json_response({"ok": True, "node_id": d.node_id, "ready": d.engine is not None})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/cluster", cluster)
    app.router.add_post("/v1/cluster/migrate", migrate)
