"""The HTTP control plane (aiohttp): WebRTC signalling, health, metrics and stream admin.

Routes::

    GET    /               the demo page (camera in, restored video out; no token needed)
    POST   /offer          {"sdp": ..., "type": "offer"} -> {"sdp": ..., "type": "answer", "session": id}
    GET    /streams        every live session and its engine streams
    GET    /streams/{id}   one session
    DELETE /streams/{id}   hang up one session
    GET    /healthz        liveness: the event loop answers (no token needed)
    GET    /readyz         readiness: model loaded and warm, room for a call, not draining (no token needed)
    GET    /metrics        Prometheus text format

Session ids start with the daemon's ``instance_id`` (``<instance_id>.<random>``),
so a balancer in front of several daemons routes ``/streams/{id}`` to the one
that owns the call; ``POST /offer`` answers with ``Location: /streams/{id}``.

Every error is JSON, ``{"error": message, "reason": short_code}``, and is
counted in ``kfgan_http_request_errors_total{route, reason}``.

Pages on the origins listed in ``cors_origins`` may call every endpoint
(aiohttp-cors answers their preflights); other origins get no CORS headers,
and since ``/offer`` takes only ``application/json``, a page elsewhere cannot
reach it without a preflight either.
"""
from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp_cors
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from kfgan_daemon.engine import StreamEngine
from kfgan_daemon.service.capacity import capacity_in_use, stream_limit
from kfgan_daemon.service.config import Settings
from kfgan_daemon.service.demo import PUBLIC_PATHS, add_demo_routes
from kfgan_daemon.service.metrics import ServiceMetrics
from kfgan_daemon.service.ratelimit import AddressRateLimit
from kfgan_daemon.service.sessions import OfferError, SessionManager
from kfgan_daemon.service.vcam import VirtualCameraMirror

log = logging.getLogger(__name__)

# Probes must work without the token: systemd, Docker and load balancers call them.
# The demo page holds no secret; the person using it types the token.
OPEN_PATHS = frozenset({"/healthz", "/readyz"}) | PUBLIC_PATHS


class OfferRequest(BaseModel):
    """The body of ``POST /offer``, as aiortc's and browsers' examples send it."""

    model_config = ConfigDict(extra="ignore")

    sdp: str
    type: Literal["offer"]


@dataclass
class ServiceState:
    """What the handlers share; the server fills in the engine once the model is warm."""

    settings: Settings
    metrics: ServiceMetrics
    sessions: SessionManager
    engine: StreamEngine | None = None
    status: Literal["starting", "loading", "warming", "ready", "draining", "failed"] = "starting"
    detail: str | None = None
    model: dict[str, str] = field(default_factory=dict)
    virtual_camera: "VirtualCameraMirror | None" = None

    def set_status(self, status: str, detail: str | None = None) -> None:
        self.status = status  # type: ignore[assignment]
        self.detail = detail
        self.metrics.ready.set(1 if status == "ready" else 0)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def unready_reason(self) -> str | None:
        """Why a balancer should send no call here now (None: it may), as ``/readyz`` says it."""
        if not self.ready:
            return self.status
        if self.engine is None or not self.engine.inference.running:
            # A dead worker is restarted within seconds; meanwhile new calls would go out unrestored.
            return "restarting"
        if len(self.sessions.sessions) >= stream_limit(self.settings.max_streams, self.engine):
            # Said before the next offer is refused, so that a balancer's health check takes
            # this daemon out of rotation rather than learning it from refused callers.
            return "full"
        return None


STATE_KEY = web.AppKey("kfgan_state", ServiceState)
OFFER_LIMIT_KEY = web.AppKey("kfgan_offer_limit", AddressRateLimit)


def error_response(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "reason": reason}, status=status, headers=headers)


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


_REASONS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
            413: "too_large"}


@web.middleware
async def errors_and_metrics(request: web.Request, handler) -> web.StreamResponse:
    """JSON for every error, aiohttp's own included, and a count for every request."""
    metrics = request.app[STATE_KEY].metrics
    route = _route_name(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = _REASONS.get(exc.status, "http_error")
        response = error_response(exc.status, reason, exc.text or exc.reason, headers=_passed_headers(exc))
        response.headers["X-Kfgan-Reason"] = reason
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = error_response(500, "internal", "internal error; see the daemon's log")
        response.headers["X-Kfgan-Reason"] = "internal"
    reason = response.headers.pop("X-Kfgan-Reason", None)
    if reason is not None:
        metrics.request_errors.labels(route, reason).inc()
    metrics.requests.labels(route, request.method, str(response.status)).inc()
    return response


def _passed_headers(exc: web.HTTPException) -> dict[str, str]:
    return {key: value for key, value in exc.headers.items() if key.lower() in ("allow", "www-authenticate")}


@web.middleware
async def bearer_token(request: web.Request, handler) -> web.StreamResponse:
    # Browsers never send credentials on a CORS preflight; aiohttp-cors answers it by the origin list alone.
    if request.path in OPEN_PATHS or _is_preflight(request) or _authorized(request):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    message = "missing bearer token" if not header else "wrong bearer token"
    return _tagged(error_response(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="kfgan-daemon"'}), "unauthorized")


def _authorized(request: web.Request) -> bool:
    return carries_token(request, request.app[STATE_KEY].settings.token)


def carries_token(request: web.Request, token: SecretStr | None) -> bool:
    """The request carries ``token`` as its bearer token, or no token is configured."""
    if token is None:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode())


def _is_preflight(request: web.Request) -> bool:
    return (request.method == hdrs.METH_OPTIONS and hdrs.ORIGIN in request.headers
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers)


def _tagged(response: web.Response, reason: str) -> web.Response:
    response.headers["X-Kfgan-Reason"] = reason
    return response


def _fail(status: int, reason: str, message: str) -> web.Response:
    return _tagged(error_response(status, reason, message), reason)


# ---- handlers ---------------------------------------------------------------


async def offer(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    rate_limit = request.app.get(OFFER_LIMIT_KEY)
    if rate_limit is not None and (wait := rate_limit.hit(request.remote or "unknown")) is not None:
        state.metrics.offers.labels("rejected").inc()
        response = _fail(429, "rate_limited", f"too many offers from {request.remote}: at most {rate_limit.rate} "
                                              f"(offer_rate_limit); retry in {wait} s")
        response.headers["Retry-After"] = str(wait)
        return response
    if request.content_type != "application/json":
        # A cross-origin page may POST text/plain without a preflight: such an offer must not create a session.
        state.metrics.offers.labels("rejected").inc()
        return _fail(415, "unsupported_media_type",
                     f"send the offer as Content-Type: application/json, not {request.content_type}")
    limit = state.settings.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        state.metrics.offers.labels("rejected").inc()
        return _fail(413, "too_large", f"request body of {request.content_length} bytes exceeds max_request_bytes={limit}")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        state.metrics.offers.labels("rejected").inc()
        return _fail(413, "too_large", f"request body exceeds max_request_bytes={limit}")
    try:
        payload = OfferRequest.model_validate(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError):
        state.metrics.offers.labels("rejected").inc()
        return _fail(400, "bad_json", 'the body must be JSON: {"sdp": "...", "type": "offer"}')
    except ValidationError as exc:
        state.metrics.offers.labels("rejected").inc()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        return _fail(400, "bad_offer", f'expected {{"sdp": "...", "type": "offer"}}: {problems}')
    try:
        session, answer = await state.sessions.answer(payload.sdp, remote=request.remote)
    except OfferError as exc:
        state.metrics.offers.labels("rejected").inc()
        response = _fail(exc.status, exc.reason, str(exc))
        if exc.status == 503:
            response.headers["Retry-After"] = "5"
        return response
    state.metrics.offers.labels("answered").inc()
    state.metrics.sessions.set(len(state.sessions.sessions))
    return web.json_response(
        {"sdp": answer.sdp, "type": answer.type, "session": session.id},
        headers={"Location": f"/streams/{session.id}"},
    )


async def list_streams(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    sessions = [session.describe() for session in state.sessions.sessions.values()]
    body: dict[str, Any] = {"instance_id": state.settings.instance_id, "sessions": sessions,
                            "max_streams": state.settings.max_streams}
    if state.engine is not None:
        body["capacity"] = stream_limit(state.settings.max_streams, state.engine)
    if state.virtual_camera is not None:
        body["virtual_camera"] = state.virtual_camera.describe()
    return web.json_response(body)


async def inspect_stream(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    session = state.sessions.sessions.get(request.match_info["id"])
    if session is None:
        return _fail(404, "not_found", f"no live session {request.match_info['id']!r}")
    return web.json_response(session.describe())


async def stop_stream(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    session_id = request.match_info["id"]
    if not await state.sessions.close(session_id):
        return _fail(404, "not_found", f"no live session {session_id!r}")
    state.metrics.sessions.set(len(state.sessions.sessions))
    return web.json_response({"closed": session_id})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 ``{"status": "ready"}``, or 503 ``{"status": "not_ready", "reason": ...}``.

    Reasons: starting, loading, failed, restarting (the inference worker),
    full (every slot taken), draining (SIGTERM). The probe is open to
    balancers, so that is all it says without the token; with it (or with no
    token configured) it also names the model, the instance and the load.
    """
    state = request.app[STATE_KEY]
    reason = state.unready_reason()
    body: dict[str, Any] = {"status": "ready"} if reason is None else {"status": "not_ready", "reason": reason}
    if _authorized(request):
        body["instance_id"] = state.settings.instance_id
        if reason == "restarting":
            body["detail"] = "the inference worker stopped unexpectedly and is being restarted"
        elif state.detail:
            body["detail"] = state.detail
        if state.model:
            body["model"] = state.model
        if state.engine is not None:
            live = len(state.sessions.sessions)
            body["streams"] = live
            body["capacity"] = stream_limit(state.settings.max_streams, state.engine)
            body["capacity_in_use"] = capacity_in_use(state.settings.max_streams, state.engine, live)
    return web.json_response(body, status=200 if reason is None else 503)


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[STATE_KEY].metrics.registry
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def create_app(state: ServiceState) -> web.Application:
    """The aiohttp application; bodies above ``max_request_bytes`` are refused with 413."""
    app = web.Application(
        client_max_size=state.settings.max_request_bytes,
        middlewares=[errors_and_metrics, bearer_token],
    )
    app[STATE_KEY] = state
    if state.settings.offer_rate_limit is not None:
        app[OFFER_LIMIT_KEY] = AddressRateLimit(state.settings.offer_rate_limit)
    add_demo_routes(app)
    app.router.add_post("/offer", offer)
    app.router.add_get("/streams", list_streams)
    app.router.add_get("/streams/{id}", inspect_stream)
    app.router.add_delete("/streams/{id}", stop_stream)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if state.settings.cors_origins:
        _allow_origins(app, state.settings.cors_origins)
    return app


def _allow_origins(app: web.Application, origins: list[str]) -> None:
    """CORS on every route for exactly these origins; the token still travels in ``Authorization``, never cookies."""
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=False,
        allow_headers=(hdrs.AUTHORIZATION, hdrs.CONTENT_TYPE),
        expose_headers=(hdrs.LOCATION, hdrs.RETRY_AFTER, hdrs.WWW_AUTHENTICATE),
        max_age=600,
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)
