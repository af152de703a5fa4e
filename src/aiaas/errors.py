"""The one error hierarchy. Raise these below `api/`; one handler renders them.

ApiError                         -> {"error": {"message", "type", "param", "code"}}
├── InvalidRequest        400    bad parameter, malformed body (code names the problem)
│   └── ContextLengthExceeded    400 context_length_exceeded
├── AuthenticationFailed  401    invalid_api_key: missing, malformed, unknown, revoked, expired
├── PermissionDenied      403    insufficient_permissions: the key lacks a scope
│   └── ResidencyViolation       403 residency_violation: strict data would leave its region
├── NotFound              404    not_found (also another tenant's object)
│   └── ModelNotFound            404 model_not_found
├── MethodNotAllowed      405
├── Conflict              409    already exists / in use
├── PayloadTooLarge       413    request_too_large
├── UnsupportedMediaType  415    unsupported_media_type
├── RateLimited           429    rate_limit_exceeded (+ retry_after)
│   └── InsufficientQuota        429 insufficient_quota: the month's quota is spent
├── ClientGone            499    client_closed_request: nobody is left to read the answer
├── ServerError           500    server_error
│   └── BlobIntegrityError       500 a stored blob failed authentication
└── ServiceUnavailable    503    not ready yet
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        # Seconds after which the same request may succeed (429, 503); the API layer renders it
        # as `Retry-After`. Layers below `api/` say when, never how HTTP spells it.
        self.retry_after = retry_after
        # HTTP headers only the API layer sets (e.g. `Allow` on a 405).
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ApiError):
    status = 400
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(ApiError):
    status = 401
    code = "invalid_api_key"


class PermissionDenied(ApiError):
    status = 403
    code = "insufficient_permissions"


class ResidencyViolation(PermissionDenied):
    """Data that must stay in its region would leave it (a grant, a job elsewhere)."""

    code = "residency_violation"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ApiError):
    status = 405
    code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class RateLimited(ApiError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class InsufficientQuota(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"


class ClientGone(ApiError):
    """The client disconnected before the answer was ready: nobody will read this one (the
    status is nginx's 499, so access logs and metrics tell it from a server error)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class ServerError(ApiError):
    status = 500
    type = "server_error"
    code = "server_error"


class BlobIntegrityError(ServerError):
    """A blob's ciphertext failed authentication: tampered, truncated or under the wrong key."""

    code = "blob_integrity_error"


class ServiceUnavailable(ApiError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class BlobNotFound(NotFound):
    code = "blob_not_found"


class ConfigurationError(Exception):
    """A setting cannot be honoured; raised at start, never on a request."""
