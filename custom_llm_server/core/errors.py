"""Errors a caller sees, in OpenAI's shape: one exception for every module, with no HTTP in it.

Raised anywhere (the upstream client, the voice, the tools' loop); the HTTP layer (serving/)
answers it with its status before the first byte, or as one error event after it.
"""

from typing import Any


class ApiError(Exception):
    """An error the caller sees, in OpenAI's shape; the details stay in the log."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        code: str | None = None,
        param: str | None = None,
        retryable: bool = False,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.retryable = retryable  # an upstream failure another attempt might not have
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, code: str, param: str | None = None, status: int = 400) -> ApiError:
    return ApiError(status, message, "invalid_request_error", code, param)


def upstream_error(status: int, message: str, code: str, retryable: bool = False) -> ApiError:
    return ApiError(status, message, "upstream_error", code, retryable=retryable)


def overloaded(what: str) -> ApiError:
    """A quick 503 when a concurrency cap is reached: a fast refusal beats a slow queue."""
    return ApiError(
        503,
        f"The server is at capacity ({what}); try again shortly.",
        "server_error",
        "overloaded",
        headers={"retry-after": "1"},
    )


def internal_error() -> ApiError:
    return ApiError(
        500, "The server failed to handle this request; the log has details.", "server_error", "internal_error"
    )


SHUTTING_DOWN = ApiError(
    503, "The server is shutting down; this answer was cut short.", "server_error", "shutting_down"
)
