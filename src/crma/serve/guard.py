"""The bearer key on every /v1 path (constant-time compare) and body caps (413), before any route."""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING

from crma.serve.errors import APIError

if TYPE_CHECKING:
    from crma.serve.server import Server

GUARDED = ("/v1", "/ui/")  # the OpenAI API and the dashboard's data; `/` and /static are open


class Guard:
    """ASGI middleware: the key (on /v1 and the dashboard's /ui/ data) and the body size."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        key = server.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["path"].startswith(GUARDED) and self.expected is not None:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await send_error(
                    send, APIError(401, "invalid API key", None, "invalid_api_key")
                )
        s = self.server.settings
        limit = s.max_file_bytes if scope["path"] == "/v1/files" else s.max_body_bytes
        too_big = APIError(413, f"the request body is over {limit} bytes", None, "too_large")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            return await send_error(send, APIError(400, "bad Content-Length header"))
        if int(declared) > limit:
            return await send_error(send, too_big)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await send_error(send, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
