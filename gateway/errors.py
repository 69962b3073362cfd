"""One exception hierarchy for everything the gateway answers with an error.

Handlers raise; ``app.py`` renders each error once, in the shape of the dialect that was
called. An exception outside this hierarchy becomes a generic 500 with no internal text.
"""

from __future__ import annotations


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code


class InvalidRequest(ApiError):
    status, type = 400, "invalid_request_error"


class Unauthorized(ApiError):
    # OpenAI's type and code; its message starts "Incorrect API key provided", which clients such as
    # LiteLLM read to tell a bad key (AuthenticationError) from a bad request.
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(ApiError):
    # Not "invalid_request_error": clients (LiteLLM) read that as a bad request, not a refusal.
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(ApiError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ApiError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class RequestTimeout(ApiError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class Conflict(ApiError):
    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(ApiError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class WrongType(ApiError):
    """A field is present but of the wrong JSON type: a 400, as OpenAI and Ollama answer (clients
    catch it as a bad request), the ``code`` says which kind."""

    status, type, code = 400, "invalid_request_error", "invalid_type"


class Overloaded(ApiError):
    status, type, code = 429, "rate_limit_error", "overloaded"


class RateLimited(ApiError):
    """A key over one of its limits (OpenAI's code; the message says which limit)."""

    status, type, code = 429, "requests", "rate_limit_exceeded"


class QuotaExceeded(ApiError):
    """A key whose token budget for the day or month is spent (OpenAI's type and code)."""

    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class EngineFailed(ApiError):
    status, type, code = 500, "server_error", "engine_error"


class NoLiveWorker(ApiError):
    status, type, code = 503, "service_unavailable", "no_live_worker"


class QueueDown(ApiError):
    status, type, code = 503, "service_unavailable", "queue_unavailable"


class Busy(ApiError):
    """The gateway's budget for something all clients share (bodies in flight) is spent for now."""

    status, type, code = 503, "service_unavailable", "server_busy"


class ShuttingDown(ApiError):
    status, type, code = 503, "service_unavailable", "shutting_down"


class GatewayTimeout(ApiError):
    status, type, code = 504, "timeout", "timeout"
