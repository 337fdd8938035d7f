"""The admin listener, on its own port, never the proxy's.

- ``GET /healthz`` answers 200 while the process serves at all.
- ``GET /readyz`` answers 200 once the config is loaded and the proxy listener
  accepts, 503 with the reasons otherwise (e.g. while shutting down).
- ``GET /metrics``: Prometheus text from the app's registry.
- ``GET /tokens``: per credential, what the token cache holds (expiry, age, fetch
  count, last error), never a token or secret.
- ``POST /tokens/flush`` (``?client=NAME`` for one client): drop cached tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from m2m_proxy.tokens.cache import CredentialState, TokenCache


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


def admin_routes(
    readiness: Readiness,
    *,
    registry: CollectorRegistry,
    tokens: Callable[[], TokenCache | None],
    clients: Callable[[], set[str]],
) -> list[web.RouteDef]:
    """``tokens`` and ``clients`` are read per request: the cache starts after the
    routes are built, and a config reload may change the clients."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        if readiness.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not_ready", "missing": readiness.missing}, status=503)

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def token_states(_request: web.Request) -> web.Response:
        cache = tokens()
        states = cache.states() if cache is not None else []
        now = time.monotonic()
        return web.json_response(
            {"credentials": [describe_state(state, now=now, wall=time.time()) for state in states]}
        )

    async def flush(request: web.Request) -> web.Response:
        client = request.query.get("client")
        if client is not None and client not in clients():
            return web.json_response(
                {"error": "unknown_client", "detail": f"no client named '{client}'"}, status=404
            )
        cache = tokens()
        dropped = cache.flush(client) if cache is not None else 0
        return web.json_response({"dropped": dropped, "client": client})

    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
        web.get("/tokens", token_states),
        web.post("/tokens/flush", flush),
    ]


def describe_state(state: CredentialState, *, now: float, wall: float) -> dict[str, Any]:
    """One credential for ``/tokens``: monotonic times become ages and UTC dates."""

    def date(moment: float | None) -> str | None:
        if moment is None:
            return None
        return datetime.fromtimestamp(wall - (now - moment), UTC).isoformat(timespec="seconds")

    key, token = state.key, state.token
    return {
        "client": key.client,
        "scope": list(key.scope),
        "audience": key.audience,
        "resource": key.resource,
        "token_params": sorted(name for name, _ in key.token_params),
        "held": token is not None and token.expires_at > now,
        "expires_at": date(token.expires_at) if token else None,
        "expires_in_s": round(token.expires_at - now, 1) if token else None,
        "age_s": round(now - token.obtained_at, 1) if token else None,
        "refresh_at": date(token.refresh_at) if token else None,
        "fingerprint": token.fingerprint or None if token else None,
        "fetches": state.fetches,
        "last_error": state.last_error,
        "last_error_at": date(state.last_error_at),
        "next_fetch_not_before": date(state.held_until),
    }
