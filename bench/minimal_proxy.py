"""Reference proxy for the benchmark: about the least work an aiohttp proxy can do.

Reverse mode to one fixed upstream, a fixed ``Authorization: Bearer $BENCH_TOKEN``, hop-by-hop
headers stripped both ways, the response streamed back. One keep-alive ClientSession, uvloop.
Usage: ``BENCH_TOKEN=... python bench/minimal_proxy.py --listen 127.0.0.1:8081 UPSTREAM_URL``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr

_HOP = "Connection Keep-Alive Proxy-Connection TE Trailer Transfer-Encoding Upgrade Host"
HOP = frozenset(istr(h) for h in (*_HOP.split(), "Proxy-Authorization", "Proxy-Authenticate"))


def strip(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k not in HOP)


async def serve(host: str, port: int, upstream: str, authorization: str) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = strip(request.headers)
        headers["Authorization"] = authorization
        body = request.content if request.body_exists else None
        url = upstream + request.raw_path
        async with session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as resp:
            out = web.StreamResponse(status=resp.status, reason=resp.reason)
            out.headers.extend(strip(resp.headers))
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="minimal aiohttp reverse proxy (benchmark)")
    parser.add_argument("--listen", default="127.0.0.1:8081", help="host:port")
    parser.add_argument("upstream", help="upstream origin, e.g. http://127.0.0.1:9500")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    token = os.environ["BENCH_TOKEN"]
    uvloop.run(serve(host, int(port), args.upstream.rstrip("/"), f"Bearer {token}"))


if __name__ == "__main__":
    main()
