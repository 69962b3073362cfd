"""httpx's API on aiohttp's HTTP/1.1: the worker's calls to the gateway for less CPU.

Measured on a 2-core VM against the same server: a call through httpx's own asyncio transport
(httpcore on anyio, h11) costs about 0.70 ms of CPU, through this one 0.42 ms (aiohttp alone
0.19 ms; the rest is httpx's request and response models). On the worker's hot path (a lease
and a post per batch) that CPU comes out of the cores the engine and the gateway share. The
client code, its timeouts and its tenacity retries stay plain httpx: only the bytes move
through aiohttp.

Every aiohttp failure becomes the httpx error a caller would get from httpx itself (all
``httpx.TransportError``s, so retries and the worker's error handling see no difference), and
bodies are read whole (the gateway's answers are small and never streamed).
"""

from __future__ import annotations

import aiohttp
import httpx


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None  # made in the event loop, on first use

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)  # httpx decodes, as with its own transport
        timeout = request.extensions.get("timeout", {})
        limits = aiohttp.ClientTimeout(
            connect=timeout.get("pool"), sock_connect=timeout.get("connect"), sock_read=timeout.get("read")
        )
        try:
            async with self._session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=request.content or None,
                allow_redirects=False,
                timeout=limits,
            ) as response:
                content = await response.read()
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc), request=request) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out waiting for the gateway", request=request) from exc
        except aiohttp.ClientError as exc:  # a dropped connection, a malformed answer: the exchange failed
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            content=content,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
