"""The baseline for the gateway path: a bare ASGI endpoint answering every POST with fixed bytes
(embedq's own answer to the same request), so only the queue hop differs."""

from __future__ import annotations

import os


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                with open(os.environ["BENCH_BARE_BODY"], "rb") as body:
                    app.body = body.read()
                await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": app.body})
