"""The floor for a Python hop: a bare ASGI relay with the same uvicorn and aiohttp as the server,
and nothing else (no routing, auth, validation, logging or SSE parsing).

`python3 bench/null_relay.py PORT UPSTREAM_URL`. The benchmark runs it beside the server so the
report separates what Python and the network hop cost from what our own code costs.
"""

import sys

import aiohttp
import uvicorn
from asgi import read_body

UPSTREAM = sys.argv[2]
session: aiohttp.ClientSession | None = None


async def app(scope, receive, send):
    global session
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            await send({"type": "lifespan.startup.complete"})
        await session.close()
        return await send({"type": "lifespan.shutdown.complete"})
    body = await read_body(receive)
    async with session.post(UPSTREAM, data=body, headers={"content-type": "application/json"}) as response:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        async for piece in response.content.iter_any():
            await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False, backlog=4096)
