"""The web console at ``/ui/``, for the people who run the fleet (``EMBEDQ_UI=false``: none).

Sign-in with an admin token (``session.py``, ``web.py``), then pages drawn in the browser by
small ES modules (``static/``: no build step, nothing fetched from elsewhere) from JSON the
console serves (``data.py``) and the admin and Batches APIs' own handlers, which a signed-in
session may call under ``/ui/api`` with its CSRF token. The fleet's traffic over the last hour
comes from ``activity.py``, shared through Redis, so any replica shows the whole fleet.
"""

from __future__ import annotations

from starlette.routing import Route

from gateway.batches import api as batches
from gateway.console import data, web
from gateway.console.session import Sessions
from gateway.tenancy import admin

__all__ = ["Sessions", "routes"]


def _api(path: str, handler: web.Handler, method: str = "GET") -> Route:
    return Route("/ui/api" + path, web.guarded(handler), methods=[method])


routes = [
    Route("/ui", web.to_shell, methods=["GET"]),
    Route("/ui/", web.guarded(web.shell, page=True), methods=["GET"]),
    Route("/ui/login", web.guarded(web.login_form, signed_in=False), methods=["GET"]),
    Route("/ui/login", web.guarded(web.login, signed_in=False), methods=["POST"]),
    Route("/ui/logout", web.guarded(web.logout), methods=["POST"]),
    Route("/ui/static/{name:path}", web.guarded(web.static, signed_in=False), methods=["GET"]),
    _api("/session", data.session),
    _api("/fleet", data.fleet),
    _api("/activity", data.activity),
    _api("/embed", data.embed, "POST"),
    _api("/keys", admin.list_keys),
    _api("/keys", admin.create_key, "POST"),
    _api("/keys/{name}", admin.update_key, "PATCH"),
    _api("/keys/{name}", admin.revoke_key, "DELETE"),
    _api("/usage", admin.usage),
    _api("/batches", batches.list_batches),
    _api("/batches/{batch_id}/cancel", batches.cancel_batch, "POST"),
    _api("/files/{file_id}/content", batches.file_content),
]
