"""The HTTP face of ``kfgan-daemon janus``: what a supervisor and an operator ask of it.

``/healthz`` (the process answers), ``/readyz`` (connected to Janus and the
engine warm: 200; else 503 with the reason: ``loading``, ``reconnecting``,
``draining``), ``/metrics`` (Prometheus) and ``/publishers`` (every watched
publisher and what the daemon does with it). As with ``serve``, the bearer
``token`` guards all but the two probes.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import SecretStr

from kfgan_daemon.service.app import carries_token

_OPEN_PATHS = {"/healthz", "/readyz"}


def create_status_app(
    status: Callable[[], str],
    publishers: Callable[[], dict[str, Any]],
    registry: CollectorRegistry,
    token: SecretStr | None,
) -> web.Application:
    """``status()`` is "ready" or the reason the attachment is not; ``publishers()`` the body of ``/publishers``."""

    @web.middleware
    async def bearer_token(request: web.Request, handler) -> web.StreamResponse:
        if request.path in _OPEN_PATHS or carries_token(request, token):
            return await handler(request)
        return web.json_response({"error": "missing or wrong bearer token", "reason": "unauthorized"}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="kfgan-daemon"'})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        now = status()
        if now == "ready":
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not_ready", "reason": now}, status=503)

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def list_publishers(request: web.Request) -> web.Response:
        return web.json_response(publishers())

    app = web.Application(middlewares=[bearer_token])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/publishers", list_publishers)
    return app
