"""Reading a request: a JSON body read with a size cap, validated by a pydantic model into a 400 that
names the field; and the OpenAPI schema of the models the routes validate themselves."""

import logging
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import Request

from custom_llm_server.core.errors import bad_request
from custom_llm_server.core.redact import printable
from custom_llm_server.serving.errors import invalid_value

log = logging.getLogger("custom_llm")


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], body: dict[str, Any]) -> M:
    """The body as the request model; the first problem as a 400 that names the field."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        raise invalid_value(dict(first), first["loc"]) from None


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, read with a size cap so a huge body costs nothing."""
    content_type = request.headers.get("content-type", "application/json")
    if "json" not in content_type.lower():
        raise bad_request(
            f"Send the body as application/json, not {printable(content_type, 60)}.",
            "unsupported_media_type",
            status=415,
        )
    too_large = bad_request(f"The request body is larger than {limit} bytes.", "body_too_large", status=413)
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    try:
        body = orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError as error:
        raise bad_request(f"The body is not valid JSON: {error.msg}.", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.", "invalid_json")
    return body


def openapi_with(app: FastAPI, *models: type[BaseModel]) -> dict[str, Any]:
    """FastAPI's schema, plus the request models that routes reading their own body validate."""
    if not app.openapi_schema:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, definitions = models_json_schema(
            [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema
