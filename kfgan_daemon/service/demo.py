"""The demo page at ``/``: the browser's camera goes to ``/offer`` and the restored video comes back beside it.

Plain HTML, CSS and JavaScript shipped in the package (``static/``), served
without the bearer token (the page holds no secret; the person using it types
the token, which the page sends in the ``Authorization`` header).
"""
from __future__ import annotations

from importlib.resources import files

from aiohttp import web

STATIC = files(__package__) / "static"

# Path -> (file in static/, content type).
PAGES = {
    "/": ("index.html", "text/html"),
    "/demo.js": ("demo.js", "text/javascript"),
    "/demo.css": ("demo.css", "text/css"),
}
PUBLIC_PATHS = frozenset(PAGES)

# The page loads nothing from elsewhere and is never framed; 'self' covers
# fetch() to the daemon that served it.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_demo_routes(app: web.Application) -> None:
    """Serve the demo page and its two assets; read once, when the app is built."""
    for path, (name, content_type) in PAGES.items():
        app.router.add_get(path, _serve((STATIC / name).read_bytes(), content_type), name=f"demo:{name}")


def _serve(body: bytes, content_type: str):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)

    return handler
