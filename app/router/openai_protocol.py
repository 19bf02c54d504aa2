"""The slice of the OpenAI HTTP protocol the Router owns: request checks and the error envelope.

The Router validates only what it needs to route safely (a JSON object naming a served model, the
fields a route requires, their basic types); vLLM's own server validates the rest and its errors are
passed through unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Route(str, Enum):
    """Proxied OpenAI routes and the field each one requires."""

    COMPLETIONS = "/v1/completions"
    CHAT_COMPLETIONS = "/v1/chat/completions"

    @property
    def required_field(self) -> str:
        return "prompt" if self is Route.COMPLETIONS else "messages"


class ErrorType(str, Enum):
    INVALID_REQUEST = "invalid_request_error"
    NOT_FOUND = "not_found_error"
    UNAUTHORIZED = "authentication_error"
    UNAVAILABLE = "service_unavailable_error"
    UPSTREAM = "upstream_error"


# Not frozen: Python sets an exception's __traceback__ as it travels (contextlib's __exit__ among
# others), which a frozen dataclass refuses.
@dataclass(eq=False)
class ApiError(Exception):
    """An error answered to the client in OpenAI's envelope."""

    status: int
    message: str
    type: ErrorType
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type.value,
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, ErrorType.INVALID_REQUEST, param, code)


def model_not_found(name: str) -> ApiError:
    return ApiError(404, f"The model '{name}' does not exist.", ErrorType.NOT_FOUND, "model",
                    "model_not_found")


def no_replica_ready(role: str | None = None, retry_after_s: int = 5, why: str | None = None,
                     code: str = "no_replica_ready") -> ApiError:
    """``role``: the pool that has none ready, in a disaggregated App; ``why``: why the request was not
    held until one is (``code`` names that case)."""
    which = f"No {role} replica" if role else "No replica"
    return ApiError(503, f"{which} is ready to serve this model{f' and {why}' if why else ''}; retry shortly.",
                    ErrorType.UNAVAILABLE, None, code, retry_after_s)


def upstream_failed(detail: str) -> ApiError:
    return ApiError(502, f"The replica failed while serving the request: {detail}", ErrorType.UPSTREAM,
                    None, "replica_failed")


def unauthorized() -> ApiError:
    return ApiError(401, "Scaling is allowed from loopback, or with the admin token "
                    "('Authorization: Bearer <token>').", ErrorType.UNAUTHORIZED, None, "unauthorized")


@dataclass(frozen=True)
class ProxiedRequest:
    """A client request that passed the Router's checks, ready to forward. ``raw`` is what the
    client sent, forwarded byte for byte: re-encoding would cost time and could change numbers."""

    route: Route
    body: dict[str, Any]
    raw: bytes

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream", False))


def parse_request(route: Route, raw: bytes, served_models: set[str]) -> ProxiedRequest:
    """Parse and check a client body. Raises ``ApiError`` (400 or 404) with the offending field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string.", "model")
    field = route.required_field
    if field not in body:
        raise bad_request(f"'{field}' is required.", field)
    if route is Route.CHAT_COMPLETIONS and not (isinstance(body[field], list) and body[field]):
        raise bad_request("'messages' must be a non-empty array.", field)
    if route is Route.COMPLETIONS and not isinstance(body[field], (str, list)):
        raise bad_request("'prompt' must be a string or an array.", field)
    if not isinstance(body.get("stream", False), bool):
        raise bad_request("'stream' must be a boolean.", "stream")
    if model not in served_models:
        raise model_not_found(model)
    return ProxiedRequest(route, body, raw)
