"""The console's sign-in, its pages, and the guard every console route goes through.

    GET  /ui/login           the sign-in form (plain HTML, no script)
    POST /ui/login           an admin token -> a session cookie (session.py), then /ui/
    POST /ui/logout          ends the session (CSRF token required), then /ui/login
    GET  /ui/                the app's shell; its ES modules draw each page (static/)
    GET  /ui/static/<file>   those modules and the style sheet: code only, no data
    /ui/api/...              the data (data.py); changes carry the session's CSRF token

Without a session a page redirects to the sign-in form and data answers 401. Every answer
carries a strict Content-Security-Policy (scripts and styles from /ui/static only: no inline
script, no inline style), ``frame-ancestors 'none'`` and ``X-Frame-Options: DENY``, and is not
cached. Cross-site form posts are refused before they get here (``guard.py``: Origin).
"""

from __future__ import annotations

import html
import logging
import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import CONSOLE_ADMIN
from gateway.console.session import COOKIE, CSRF_HEADER, SESSION_TTL_S, Session
from gateway.errors import ApiError, NotFound, Unauthorized, UnsupportedMediaType
from gateway.http import error_response, read_body
from gateway.queue import QueueUnavailable
from gateway.redis_link import unreachable

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
SERVED = (".js", ".css", ".svg")
Handler = Callable[[Request], Awaitable[Response]]
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make the sign-in form's Origin "null" (guard.py refuses it)
    "Cache-Control": "no-store",
}


def guarded(handler: Handler, *, signed_in: bool = True, page: bool = False) -> Handler:
    """The handler behind the console's guard: a live session first (a page without one goes to
    the sign-in form), its CSRF token on every change; our errors in the admin API's shape; the
    console's headers on every answer."""

    async def endpoint(request: Request) -> Response:
        try:
            if signed_in:
                session = await _session(request)
                if session is None:
                    if page:
                        return _secured(Response(status_code=303, headers={"Location": "/ui/login"}))
                    raise Unauthorized("sign in to the console first: POST /ui/login with an admin token")
                if not session.allows(request.method, request.headers.get(CSRF_HEADER, "")):
                    raise Unauthorized("this change needs the session's CSRF token in X-CSRF-Token")
                request.scope[CONSOLE_ADMIN] = True
                request.state.session = session
            response = await handler(request)
        except ApiError as error:
            response = error_response(request.url.path, error)
        except (RedisError, QueueUnavailable) as exc:  # sessions, and with replicas the console's data, live in Redis
            response = error_response(request.url.path, unreachable(exc, request.app.state.settings.retry_after_s))
        return _secured(response)

    return endpoint


async def _session(request: Request) -> Session | None:
    session = await request.app.state.sessions.find(request.cookies.get(COOKIE, ""))
    if session is None or not request.app.state.auth.admin_still(session.admin):
        return None
    return session


def _secured(response: Response) -> Response:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _form_page(message: str, status: int) -> Response:
    text = (STATIC / "login.html").read_text().replace("{message}", html.escape(message))
    return Response(text, status_code=status, media_type="text/html")


async def login_form(request: Request) -> Response:
    if not request.app.state.auth.console_open:
        return _form_page("The console is off: no admin token is configured (set EMBEDQ_ADMIN_TOKENS).", 403)
    if await _session(request) is not None:
        return Response(status_code=303, headers={"Location": "/ui/"})
    return _form_page("", 200)


async def login(request: Request) -> Response:
    auth = request.app.state.auth
    if not auth.console_open:
        return _form_page("The console is off: no admin token is configured (set EMBEDQ_ADMIN_TOKENS).", 403)
    if request.headers.get("content-type", "").partition(";")[0].strip() != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("sign in with the form: application/x-www-form-urlencoded, field 'token'")
    try:
        form = parse_qs((await read_body(request)).decode("utf-8", "replace"), max_num_fields=4)
    except ValueError:  # more fields than the form has: no browser sent it
        return _form_page("Sign in with the form: one field, 'token'.", 400)
    fingerprint = auth.admin_fingerprint(form.get("token", [""])[0].strip())
    if fingerprint is None:
        return _form_page("That is not an admin token of this gateway.", 401)
    session_id, _ = await request.app.state.sessions.open(fingerprint)
    response = Response(status_code=303, headers={"Location": "/ui/"})
    response.set_cookie(COOKIE, session_id, max_age=SESSION_TTL_S, path="/ui", httponly=True, samesite="strict",
                        secure=_over_tls(request))  # fmt: skip
    return response


async def logout(request: Request) -> Response:
    await request.app.state.sessions.close(request.cookies.get(COOKIE, ""))
    response = Response(status_code=303, headers={"Location": "/ui/login"})
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict", secure=_over_tls(request))
    return response


def _over_tls(request: Request) -> bool:
    """TLS here, or ended by a proxy in front (an Ingress) that says so. Trusting the header can
    only make the cookie stricter."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


async def shell(request: Request) -> Response:
    return Response((STATIC / "index.html").read_bytes(), media_type="text/html")


async def to_shell(request: Request) -> Response:
    return Response(status_code=303, headers={"Location": "/ui/"})


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    path = (STATIC / name.replace("\0", "")).resolve()  # a NUL is in no file's name; os calls raise on it
    if "\0" in name or not path.is_relative_to(STATIC.resolve()) or not path.is_file() or path.suffix not in SERVED:
        raise NotFound(f"no console file {name!r}")
    media_type = "text/javascript" if path.suffix == ".js" else mimetypes.guess_type(path.name)[0]
    return Response(path.read_bytes(), media_type=media_type)
