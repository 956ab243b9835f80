"""HTTP intake: a CapMonster-compatible endpoint, so any bot in any language reports
fire-and-forget by changing only its base URL (``report-forwarder serve``).

Routes::

    POST /reportIncorrectImageCaptcha | TokenCaptcha | Recaptcha | Hcaptcha
         {"clientKey": ..., "taskId": ...}  -> {"errorId": 0, "status": "success"}, at once
    POST /v1/reports    JSON array or JSON lines of {"taskId", "captchaType", "account"?}
    GET  /healthz       Redis reachable, queue depth (no token needed)
    GET  /metrics       Prometheus
    GET  /v1/stats      the numbers `report-forwarder stats --json` shows
    GET  /              a live status page (served from here; no CDN)

The clientKey is matched, in constant time, against every configured account's key; the
report is queued for that account. Bad input gets an ``errorId: 1`` answer with a
descriptive code and a 4xx status, never a 500 or a traceback, and a key is never echoed:
what an answer quotes of a request (a taskId, the path, the content type) has every
configured key and the intake token masked (:mod:`worker.intake.input`).
Reports arriving together are queued in one Redis round trip (natural batching: while
one enqueue is in flight the next ones gather), so producers never wait on each other.

A raw ASGI app on uvicorn (uvloop + httptools), chosen by bench/intake.py; the deadlines
and connection caps around it are in :mod:`worker.intake.server`, the reading and checking
of bodies in :mod:`worker.intake.input`. An exception that is not the client's fault is
logged (``intake.failed``) and answered 500 ``ERROR_INTERNAL`` — hostile input never gets
that far.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import asdict
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, generate_latest

from worker.errors import (
    ReportError,
    StoreError,
    StoreOutcomeUnknownError,
    StoreUnreplicatedError,
)
from worker.intake.batching import Batcher, ClientLimiter
from worker.intake.input import (
    ClientGoneError,
    ItemRefusal,
    Reason,
    Refusal,
    bulk_items,
    bulk_row,
    json_object,
    query_values,
    read_body,
    shorten,
    task_id,
)
from worker.intake.server import (
    ConnectionGuard,
    ConnectionLimits,
    fitted,
    raise_fd_limit,
    uvicorn_config,
)
from worker.observability.logs import get_logger, register_secret
from worker.observability.metrics import Metrics
from worker.producer import validate
from worker.settings import Settings, builtin_providers, client_key
from worker.store import connection as store
from worker.store.keys import Keys
from worker.store.ledger import ENQUEUE_SCRIPT
from worker.store.messages import list_keys
from worker.store.replication import replica_acks
from worker.store.vocabulary import EnqueueRow

log = get_logger("worker.intake")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# The CapMonster report paths, and the captchaType each stands for: the capmonster profile's
# endpoints (config/providers.toml as checked in, read by the settings loader; an endpoint's
# key, a family or kind, is also a captchaType name), plus two aliases of the intake's own:
# Anti-Captcha's per-family methods, which CapMonster also answers and that protocol's
# clients call. They are not endpoints of the profile, which sends such reports to its token
# endpoint; as endpoints they would change where the worker delivers them.
_CAPMONSTER = builtin_providers()["capmonster"]
REPORT_ROUTES = {path: name for name, path in _CAPMONSTER.endpoints.items()} | {
    "/reportIncorrectRecaptcha": "recaptcha",
    "/reportIncorrectHcaptcha": "hcaptcha",
}
MAX_REPORT_BYTES = 16 * 1024
MAX_BULK_BYTES = 8 * 1024 * 1024
MAX_BULK_ITEMS = 50_000
MAX_REFUSALS_LISTED = 1000  # a bulk answer lists this many refusals, then counts them
BATCH = 1000
_SUCCESS = b'{"errorId":0,"status":"success"}'
_INTERNAL = (
    b'{"errorId":1,"errorCode":"ERROR_INTERNAL",'
    b'"errorDescription":"internal error of the intake; it has been logged"}'
)
_UNAVAILABLE = (
    b'{"errorId":1,"errorCode":"ERROR_SERVICE_UNAVAILABLE",'
    b'"errorDescription":"the queue is unreachable; retry shortly"}'
)
# A StoreOutcomeUnknownError (too few replicas confirmed the enqueue, or its answer was
# lost after it was sent): the report may be queued and delivered, so the answer is
# "retry here", never "not accepted"
UNCONFIRMED_CODE = "ERROR_OUTCOME_UNKNOWN"
UNCONFIRMED = (
    "the report may be queued: the queue's primary has it, but fewer replicas than "
    "redis.min_replicas_ack confirmed it in time. Retrying here is safe (report-forwarder "
    "deduplicates: it is not sent twice); sending it elsewhere is not"
)
UNCONFIRMED_BULK = (
    "the reports listed in unconfirmed may be queued (the queue's primary has them, but "
    "fewer replicas than redis.min_replicas_ack confirmed them in time); those in "
    "not_queued were not tried. Retrying them, or the whole request, here is safe "
    "(report-forwarder deduplicates); sending the unconfirmed ones elsewhere is not"
)
LOST = (
    "the report may be queued: the enqueue may have reached the queue, but its answer was "
    "lost (a timeout or a dropped connection). Retrying here is safe (report-forwarder "
    "deduplicates: it is not sent twice); sending it elsewhere is not"
)
LOST_BULK = (
    "the reports listed in unconfirmed may be queued (their enqueue may have reached the "
    "queue, but its answer was lost: a timeout or a dropped connection); those in "
    "not_queued were not tried. Retrying them, or the whole request, here is safe "
    "(report-forwarder deduplicates); sending the unconfirmed ones elsewhere is not"
)


def _unknown(description: str) -> bytes:
    return json.dumps(
        {"errorId": 1, "errorCode": UNCONFIRMED_CODE, "errorDescription": description}
    ).encode()


_UNCONFIRMED, _LOST = _unknown(UNCONFIRMED), _unknown(LOST)


class Intake:
    """The ASGI application."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        *,
        token: str | None = None,
        environ: Mapping[str, str] | None = None,
        client_rate: float = 2000.0,
        enqueue: bool = True,
    ) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.token = token
        register_secret(token)  # masked in logs and in what answers quote of a request
        self.enqueue_enabled = enqueue  # False: the constant-answer ceiling of bench/intake.py
        self.keys = Keys(settings.key_prefix)
        self.api_keys: list[tuple[bytes, str]] = []
        for account in settings.accounts.values():
            key = client_key(account, environ)
            if key:
                register_secret(key)
                self.api_keys.append((key.encode(), account.name))
        self.limiter = ClientLimiter(client_rate, client_rate * 2)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "report_forwarder_intake_requests",
            "Intake HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.metrics = Metrics(self.registry)
        self.client: aioredis.Redis | None = None
        self.sync_client: redis.Redis | None = None
        self.batcher: Batcher | None = None
        self.page = resources.files("worker.intake").joinpath("status.html").read_bytes()

    # -- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        route = path if path in REPORT_ROUTES or path in _ROUTES else "other"
        try:
            status, body, ctype = await self._dispatch(scope, receive, path)
        except Refusal as refusal:
            status, ctype = refusal.status, b"application/json"
            body = json.dumps(
                {"errorId": 1, "errorCode": refusal.code, "errorDescription": refusal.description}
            ).encode()
        except (redis.RedisError, StoreError, OSError, TimeoutError) as exc:
            log.warning("intake.redis_failed", error=f"{type(exc).__name__}: {exc}")
            status, ctype, body = 503, b"application/json", _UNAVAILABLE
        except StoreOutcomeUnknownError as exc:  # may be queued: retrying here is safe
            log.warning("intake.unconfirmed", route=route, error=str(exc))
            body = _UNCONFIRMED if isinstance(exc, StoreUnreplicatedError) else _LOST
            status, ctype = 503, b"application/json"
        except ClientGoneError:
            self.requests.labels(route, "gone").inc()
            return
        except Exception as exc:  # a bug of ours, never a client's fault: logged, then 500
            log.error("intake.failed", route=route, error=repr(exc)[:300], exc_info=True)
            status, ctype, body = 500, b"application/json", _INTERNAL
        self.requests.labels(route, str(status)).inc()
        headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
        if status in (429, 503):
            headers.append((b"retry-after", b"1"))
        elif status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="report-forwarder"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        self.client = store.connect_async(self.redis_url, connect_timeout_s=5)
        self.sync_client = store.connect(self.redis_url, retries=2)
        self.metrics.watch(self.sync_client, self.settings)
        self.batcher = Batcher(
            self.client.register_script(ENQUEUE_SCRIPT),
            self.keys,
            self.settings.queue,
            acks=replica_acks(self.settings, self.settings.connect_retry_s),
            retry_s=self.settings.connect_retry_s,
        )

    async def shutdown(self) -> None:
        if self.client is not None:
            await store.close_async(self.client)
        if self.sync_client is not None:
            store.close(self.sync_client)

    # -- routes ------------------------------------------------------------------------

    async def _dispatch(
        self, scope: Scope, receive: Receive, path: str
    ) -> tuple[int, bytes, bytes]:
        method = scope["method"]
        peer = (scope.get("client") or ("?", 0))[0]
        if not self.limiter.allow(peer):
            raise Refusal(429, "ERROR_TOO_MUCH_REQUESTS", "too many requests from this client")
        report_type = REPORT_ROUTES.get(path)
        if report_type is not None:
            _require(method, "POST")
            body = await read_body(scope, receive, MAX_REPORT_BYTES)
            return 200, await self._report(report_type, body), b"application/json"
        if path == "/healthz":
            _require(method, "GET")
            return await self._health()
        self._authorise(scope, path)
        if path == "/v1/reports":
            _require(method, "POST")
            body = await read_body(scope, receive, MAX_BULK_BYTES)
            return *await self._bulk(body), b"application/json"
        if path == "/v1/stats":
            _require(method, "GET")
            return 200, json.dumps(await self._stats()).encode(), b"application/json"
        if path == "/metrics":
            _require(method, "GET")
            data = await asyncio.to_thread(generate_latest, self.registry)
            return 200, data, b"text/plain; version=0.0.4; charset=utf-8"
        if path == "/":
            _require(method, "GET")
            return 200, self.page, b"text/html; charset=utf-8"
        raise Refusal(404, "ERROR_NO_SUCH_METHOD", f"no such method: {shorten(path, 120)}")

    async def _report(self, report_type: str, body: bytes) -> bytes:
        doc = json_object(body)
        account = self._account_for(doc.get("clientKey"))
        if account is None:
            raise Refusal(200, "ERROR_KEY_DOES_NOT_EXIST", "no account has this clientKey")
        try:
            number = task_id(doc.get("taskId"))
        except ItemRefusal as refusal:
            raise Refusal(400, "ERROR_NO_SUCH_CAPCHA_ID", refusal.error) from refusal
        try:  # the account's provider may have no endpoint for this kind of report
            row = validate(self.settings, number, report_type, account)
        except ReportError as exc:
            raise Refusal(400, "ERROR_NO_SUCH_METHOD", shorten(str(exc))) from exc
        if self.enqueue_enabled:
            assert self.batcher is not None
            await self.batcher.submit([row])
        return _SUCCESS

    async def _bulk(self, body: bytes) -> tuple[int, bytes]:
        """(status, answer): 200, or 503 when a chunk's outcome is unknown (too few
        replicas confirmed it, or its answer was lost) — the answer then names the items
        that may be queued (``unconfirmed``) and those not tried (``not_queued``), and
        counts those of the chunks answered before; retrying them, or the whole request,
        here is safe."""
        rows: list[EnqueueRow] = []
        indexes: list[int] = []  # each row's index in the request
        refused: list[dict[str, Any]] = []
        reasons: Tally[str] = Tally()
        for index, item in enumerate(bulk_items(body, MAX_BULK_ITEMS)):
            try:
                if isinstance(item, ItemRefusal):
                    raise item
                rows.append(bulk_row(self.settings, item))
                indexes.append(index)
            except ItemRefusal as refusal:
                reasons[refusal.reason.value] += 1
                if len(refused) < MAX_REFUSALS_LISTED:
                    refused.append({"index": index, "error": refusal.error})
        flags: list[int] = []
        status, doc = 200, dict[str, Any]()
        assert self.batcher is not None
        for start in range(0, len(rows), BATCH):  # bounded script calls for big bodies
            try:
                flags += await self.batcher.submit(rows[start : start + BATCH])
            except StoreOutcomeUnknownError as exc:
                log.warning("intake.unconfirmed", route="/v1/reports", error=str(exc))
                status, doc = 503, {"errorId": 1, "errorCode": UNCONFIRMED_CODE}
                unreplicated = isinstance(exc, StoreUnreplicatedError)
                doc["errorDescription"] = UNCONFIRMED_BULK if unreplicated else LOST_BULK
                doc["unconfirmed"] = indexes[start : start + BATCH]
                doc["not_queued"] = indexes[start + BATCH :]
                break
        queued = sum(flags)
        doc |= {"queued": queued, "duplicates": len(flags) - queued, "refused": refused}
        if reasons:  # the first MAX_REFUSALS_LISTED are listed; these count them all
            doc["refused_total"] = reasons.total()
            doc["refused_by_reason"] = dict(reasons)
        if Reason.UNKNOWN_CAPTCHA_TYPE.value in reasons:  # the names, once per answer
            doc["accepted_captcha_types"] = self.settings.captcha_types.names
        return status, json.dumps(doc).encode()

    async def _health(self) -> tuple[int, bytes, bytes]:
        assert self.client is not None
        try:
            await self.client.ping()
            depth = sum(
                [int(await self.client.llen(key)) for key in list_keys(self.settings.queue)]
            )
        except (redis.RedisError, OSError) as exc:
            down = {"status": "unavailable", "redis": f"unreachable: {type(exc).__name__}"}
            return 503, json.dumps(down).encode(), b"application/json"
        doc: dict[str, Any] = {"status": "ok", "redis": "ok", "queue_depth": depth}
        return 200, json.dumps(doc).encode(), b"application/json"

    async def _stats(self) -> dict[str, Any]:
        from worker.observability.stats import snapshot

        assert self.sync_client is not None
        return await asyncio.to_thread(snapshot, self.sync_client, self.settings)

    # -- helpers -----------------------------------------------------------------------

    def _account_for(self, key: object) -> str | None:
        """The account whose key this is; every configured key is compared, in constant time."""
        if not isinstance(key, str) or not key:
            return None
        given = key.encode("utf-8", "surrogatepass")
        found = None
        for secret, account in self.api_keys:
            if hmac.compare_digest(given, secret):
                found = account
        return found

    def _authorise(self, scope: Scope, path: str) -> None:
        """The intake token as ``Authorization: Bearer …`` (scheme in any case), or for the
        status page only, as ``?token=`` (percent-decoded)."""
        if self.token is None:
            return
        expected = self.token.encode()
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                scheme, _, given = value.strip().partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), expected):
                    return
        if path == "/":
            for given in query_values(scope.get("query_string", b""), b"token"):
                if hmac.compare_digest(given, expected):
                    return
        raise Refusal(401, "ERROR_UNAUTHORIZED", "missing or wrong intake token")


_ROUTES = frozenset({"/healthz", "/v1/reports", "/v1/stats", "/metrics", "/"})


def _require(method: str, allowed: str) -> None:
    if method != allowed:
        raise Refusal(405, "ERROR_METHOD_NOT_ALLOWED", f"use {allowed}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def clean_token(token: str | None) -> str | None:
    """The intake token without surrounding whitespace (an HTTP header cannot carry it),
    or None when there is none: unset, empty or only whitespace."""
    if token is None or not token.strip():
        return None
    return token.strip()


def serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    token: str | None,
    client_rate: float = 2000.0,
    enqueue: bool = True,
    limits: ConnectionLimits | None = None,
) -> None:
    """Run the intake on uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    fd_limit = raise_fd_limit()
    limits = fitted(limits or ConnectionLimits(), fd_limit)
    app = Intake(
        settings, store.resolve_url(settings), token=token, client_rate=client_rate, enqueue=enqueue
    )
    log.info(
        "intake.started",
        host=host,
        port=port,
        token=token is not None,
        accounts=[name for _, name in app.api_keys],
        fd_limit=fd_limit,
        **{f"limit_{k}": v for k, v in asdict(limits).items()},
    )
    guard = ConnectionGuard(limits, app.registry)
    uvicorn.Server(uvicorn_config(app, host, port, guard)).run()
