"""The admin listener: /healthz and /readyz, on its own port, never the proxy's.

``/healthz`` answers 200 while the process serves at all. ``/readyz`` answers 200
once the config is loaded and the proxy listener accepts, 503 with the reasons
otherwise (e.g. while shutting down), so orchestrators and scripts can wait on it.
"""

from __future__ import annotations

from aiohttp import web


class Readiness:
    """Named conditions that must all hold for the proxy to be ready."""

    def __init__(self, *conditions: str) -> None:
        self._missing = set(conditions)

    def satisfy(self, condition: str) -> None:
        self._missing.discard(condition)

    def withdraw(self, condition: str) -> None:
        self._missing.add(condition)

    @property
    def missing(self) -> list[str]:
        return sorted(self._missing)

    @property
    def ready(self) -> bool:
        return not self._missing


def admin_routes(readiness: Readiness) -> list[web.RouteDef]:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        if readiness.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not_ready", "missing": readiness.missing}, status=503)

    return [web.get("/healthz", healthz), web.get("/readyz", readyz)]
