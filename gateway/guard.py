"""What a web page can make a browser send, refused before any route runs.

A page on any site can make its visitor's browser send requests to the gateway on the visitor's
loopback (what ``make run`` serves, with no keys), and with DNS rebinding read the answers. So:

- ``Host`` must be a loopback name or address when the gateway is bound to loopback (any host
  when it is bound elsewhere: there keys are required), or one of ``EMBEDQ_ALLOWED_HOSTS``;
- a request carrying a cross-site ``Origin`` is refused unless that origin is in
  ``EMBEDQ_ALLOWED_ORIGINS``, for which CORS is answered (preflight and response headers); the
  worker endpoints take no browser at all;
- two ``Authorization`` headers are refused rather than one of them silently chosen.

Content types are the routes' own business: JSON routes take only JSON (``http.read_json``).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import SplitResult, urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.messages import PREFIX
from gateway.errors import ApiError, Forbidden, InvalidRequest
from gateway.http import error_response
from gateway.settings import GatewaySettings

LOOPBACK_NAMES = ("localhost",)
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_EXPOSED = "Retry-After, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, " \
    "x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens"  # fmt: skip


def _split(url: str) -> SplitResult:
    """``url`` split, or nothing at all where it does not parse (``[`` opens an IPv6 address that
    never closes): any header a stranger sends must be refused, never raise."""
    try:
        parts = urlsplit(url)
        parts.hostname, parts.port  # noqa: B018  # both parse lazily, and raise on "[::1" or ":99999"
        return parts
    except ValueError:
        return SplitResult("", "", "", "", "")


class MisdirectedRequest(ApiError):
    status, type, code = 421, "invalid_request_error", "host_not_allowed"


class BrowserGuard:
    def __init__(self, app: ASGIApp, settings: GatewaySettings):
        self._app = app
        self._any_host = "*" in settings.allowed_hosts or not settings.loopback
        self._hosts = {h.lower() for h in settings.allowed_hosts}
        self._any_origin = "*" in settings.allowed_origins
        self._origins = {o.lower().rstrip("/") for o in settings.allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await error_response(scope["path"], refusal)(scope, receive, send)
        origin = headers.get("origin")
        if origin is None or self._same_site(origin, headers.get("host", "")):
            return await self._app(scope, receive, send)
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return await self._preflight(origin, headers, send)
        await self._app(scope, receive, self._with_cors(origin, send))

    def _refusal(self, scope: Scope, headers: Headers) -> ApiError | None:
        host = headers.get("host", "")
        if not self._host_allowed(host):
            return MisdirectedRequest(
                f"this gateway does not answer for host {host[:100]!r}: call it by a loopback address, or list the name "
                "in EMBEDQ_ALLOWED_HOSTS"
            )
        if len(headers.getlist("authorization")) > 1:
            return InvalidRequest("send one Authorization header, not several", code="duplicate_authorization")
        origin = headers.get("origin")
        if origin is not None and not self._same_site(origin, host):
            if scope["path"].startswith(PREFIX) or not (self._any_origin or origin.lower().rstrip("/") in self._origins):
                return Forbidden(
                    f"cross-origin request from {origin[:100]!r} refused: list the origin in EMBEDQ_ALLOWED_ORIGINS to allow it",
                    code="origin_not_allowed",
                )
        return None

    def _host_allowed(self, host: str) -> bool:
        if self._any_host or not host:  # no Host at all (HTTP/1.0): no browser sent it
            return True
        name = _split("//" + host).hostname or ""
        if name in self._hosts or host.lower() in self._hosts or name in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    @staticmethod
    def _same_site(origin: str, host: str) -> bool:
        """The page is the gateway's own (the console): its origin names the host it called."""
        parts = _split(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()

    async def _preflight(self, origin: str, headers: Headers, send: Send) -> None:
        allow = {
            "access-control-allow-origin": origin,
            "access-control-allow-methods": CORS_METHODS,
            "access-control-allow-headers": headers.get("access-control-request-headers", "authorization, content-type"),
            "access-control-max-age": "600",
            "vary": "Origin",
        }
        raw = [(name.encode(), value.encode()) for name, value in allow.items()]
        await send({"type": "http.response.start", "status": 204, "headers": raw})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    def _with_cors(origin: str, send: Send) -> Send:
        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["access-control-allow-origin"] = origin
                headers["access-control-expose-headers"] = CORS_EXPOSED
                headers.append("vary", "Origin")
            await send(message)

        return send_with_cors
