"""Who may call what: client API keys on the client endpoints, worker tokens on the worker ones,
admin tokens on the admin API.

The three credentials never cross: a worker or admin token is no client key (401 on the client
API, even where clients need no key), a client key or admin token is no worker token (401 on the
worker API, or 403 for a client key where workers need no token), and only an admin token opens
the admin API (401 for anything else, and for everything while no admin token is configured).
The web console (``console/``) opens the admin API's handlers to a signed-in session: it marks
the request's scope (CONSOLE_ADMIN) after checking the session and its CSRF token; nothing a
client sends can set that mark.
Secrets are compared in constant time and never logged, labelled or echoed in an error.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

from starlette.requests import Request

from gateway.errors import Forbidden, Unauthorized
from gateway.settings import GatewaySettings
from gateway.tenancy import calls
from gateway.tenancy.keys import ApiKey, KeyStore

log = logging.getLogger(__name__)
CONSOLE_ADMIN = "embedq.console_admin"  # the ASGI scope key the console sets on a signed-in request


def bearer(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class Auth:
    def __init__(self, settings: GatewaySettings, keys: KeyStore | None):
        self._worker_tokens = [t.encode() for t in settings.worker_tokens]
        self._admin_tokens = [t.encode() for t in settings.admin_tokens]
        self._metrics_token = settings.metrics_token.get_secret_value().encode() if settings.metrics_token else None
        self._keys = keys

    def client(self, request: Request) -> ApiKey | None:
        """The caller's API key (None when the gateway serves anonymously); 401 if it has none."""
        presented = bearer(request)
        if presented and (_matches(presented, self._admin_tokens) or _matches(presented, self._worker_tokens)):
            raise Unauthorized("Incorrect API key provided: a worker or admin token is no API key")
        if self._keys is None:
            return None
        if not presented:
            raise Unauthorized("Incorrect API key provided: none was sent; send 'Authorization: Bearer <key>'")
        now = time.time()
        key = self._keys.lookup(presented)
        if key is None or not key.usable(now):
            raise Unauthorized("Incorrect API key provided: it is unknown, revoked or expired")
        self._keys.touch(key, now)
        call = calls.current()
        if call is not None:
            call.key = key
        return key

    @staticmethod
    def check_model(key: ApiKey | None, model: str) -> None:
        if key is not None and not key.allows(model):
            raise Forbidden(f"API key {key.name!r} may not use model {model!r}", param="model")

    def metrics(self, request: Request) -> None:
        """401 unless /metrics is open, or the caller presents the metrics token."""
        if self._metrics_token is None:
            return
        if not hmac.compare_digest(bearer(request).encode(), self._metrics_token):
            raise Unauthorized("/metrics needs the metrics token (Authorization: Bearer <token>)")

    def worker(self, request: Request) -> None:
        """401 unless the caller presents a worker token (or, with none configured, is no client)."""
        presented = bearer(request).encode()
        if _matches(presented.decode(), self._admin_tokens):
            raise Unauthorized("an admin token is no worker token")
        if not self._worker_tokens:
            if presented and self._keys is not None and self._keys.lookup(presented.decode()) is not None:
                raise Forbidden("client API keys cannot call worker endpoints")
            return
        if not _matches(presented.decode(), self._worker_tokens):
            log.warning(
                "refused a worker call to %s from %s: missing or wrong worker token",
                request.url.path,
                request.client.host if request.client else "?",
            )
            raise Unauthorized("a valid worker token is required (Authorization: Bearer <token>)")

    def admin(self, request: Request) -> None:
        """401 unless the caller presents an admin token (or is a signed-in console session)."""
        if request.scope.get(CONSOLE_ADMIN):
            return
        if not self._admin_tokens:
            raise Unauthorized("the admin API is off: no admin token is configured (EMBEDQ_ADMIN_TOKENS)")
        if not _matches(bearer(request), self._admin_tokens):
            log.warning("refused an admin call to %s: missing or wrong admin token", request.url.path)
            raise Unauthorized("the admin API needs an admin token (Authorization: Bearer <token>)")

    @property
    def console_open(self) -> bool:
        return bool(self._admin_tokens)

    def admin_fingerprint(self, presented: str) -> str | None:
        """Console sign-in: the fingerprint of the admin token presented; None if it is none."""
        if not presented or not _matches(presented, self._admin_tokens):
            log.warning("refused a console sign-in: not an admin token")
            return None
        return _fingerprint(presented.encode())

    def admin_still(self, fingerprint: str) -> bool:
        """Whether the admin token a console session was opened with is still configured."""
        return any(hmac.compare_digest(fingerprint, _fingerprint(token)) for token in self._admin_tokens)


def _fingerprint(token: bytes) -> str:
    return hashlib.sha256(b"embedq-console\0" + token).hexdigest()


def _matches(presented: str, tokens: list[bytes]) -> bool:
    """Compared against every token, always, so timing says nothing about which one nearly matched."""
    matches = [hmac.compare_digest(presented.encode(), token) for token in tokens]
    return any(matches)
