"""The composition root: the only module that builds objects and owns lifetimes.

``ProxyApp`` is an aiohttp Application serving the admin endpoints; its
``cleanup_ctx`` starts, in order, the upstream client, the IdP session and token
cache, and the proxy listener, and stops them in reverse (only what started).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields, replace

import aiohttp
from aiohttp import web

from m2m_proxy.admin import Readiness, admin_routes
from m2m_proxy.config import Config, ConfigError, ProxySettings, load_config
from m2m_proxy.connect import TunnelBroker
from m2m_proxy.egress import EgressPolicy, FilteringResolver
from m2m_proxy.errors import (
    TokenError,
    TokenRejectedError,
    TokenResponseInvalidError,
    TokenTimeoutError,
)
from m2m_proxy.files import stamp
from m2m_proxy.forward import Forwarder
from m2m_proxy.frontdoor import FrontDoor
from m2m_proxy.handler import ProxyHandler
from m2m_proxy.interception_ca import LeafCertificates, load_ca
from m2m_proxy.listener import ProxySite
from m2m_proxy.logs import Logs
from m2m_proxy.metrics import Gauges, Metrics, make_registry
from m2m_proxy.prefetch import Prefetcher
from m2m_proxy.routing import RouteTable
from m2m_proxy.tasks import TaskSet
from m2m_proxy.tokens.cache import TokenCache
from m2m_proxy.tokens.client import TokenClient
from m2m_proxy.tokens.discovery import Discovery
from m2m_proxy.tokens.material import ClientMaterial, MaterialChange
from m2m_proxy.tokens.model import CredentialKey, Token, TokenGrant
from m2m_proxy.upstream import SessionUpstream, Upstream, UpstreamPool

LISTENING = "proxy_listener"


def rejected_condition(client: str) -> str:
    """The readiness condition withdrawn while the IdP rejects a client's credentials."""
    return f"client:{client} accepted by the IdP"


@dataclass(slots=True)
class Runtime:
    """What the running app holds; filled by the cleanup_ctx steps in order."""

    config: Config
    logs: Logs
    readiness: Readiness
    metrics: Metrics = field(default_factory=Metrics)
    gauges: Gauges = field(default_factory=Gauges)
    upstream: Upstream | None = None
    egress: EgressPolicy | None = None
    tokens: TokenCache | None = None
    material: ClientMaterial | None = None
    proxy_runner: web.ServerRunner | None = None
    proxy_port: int | None = None
    handler: ProxyHandler | None = None
    broker: TunnelBroker | None = None


RUNTIME = web.AppKey("runtime", Runtime)


def build_app(config: Config, logs: Logs) -> web.Application:
    """The admin Application whose startup brings the whole proxy up."""
    app = web.Application()
    runtime = Runtime(config=config, logs=logs, readiness=Readiness(LISTENING))
    app[RUNTIME] = runtime
    app.add_routes(
        admin_routes(
            runtime.readiness,
            registry=make_registry(runtime.metrics, runtime.gauges),
            tokens=lambda: runtime.tokens,
            clients=lambda: set(runtime.config.clients),
        )
    )
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_token_cache)
    app.cleanup_ctx.append(_proxy_listener)
    return app


def _forwarding_session(
    settings: ProxySettings, resolver: aiohttp.abc.AbstractResolver | None = None
) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=30, resolver=resolver
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout_s, sock_read=settings.idle_timeout_s
        ),
        trust_env=False,
    )


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    """The upstream client. lean: one pool, whose guarded connections (to hosts no
    route names) go only to addresses the egress policy allows. aiohttp: two
    sessions, routed upstreams and everything else (its resolver enforces the policy)."""
    rt = app[RUNTIME]
    settings = rt.config.proxy
    rt.egress = EgressPolicy(settings)
    if settings.upstream_client == "aiohttp":
        rt.upstream = SessionUpstream(
            _forwarding_session(settings),
            _forwarding_session(settings, FilteringResolver(rt.egress)),
        )
    else:
        rt.upstream = UpstreamPool(
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.idle_timeout_s,
            egress=rt.egress,
        )
    yield
    await rt.upstream.close()


async def _token_cache(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    settings = rt.config.proxy
    idp_session = aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=settings.token_timeout_s),
        trust_env=False,
    )
    log = rt.logs.events

    def material_changed(change: MaterialChange) -> None:
        rt.logs.redactor.add(material.client(change.client).secrets)
        dropped = rt.tokens.forget_client(change.client, change.fingerprint) if rt.tokens else 0
        log.info(
            "client_credentials_changed",
            client=change.client,
            fingerprint=change.fingerprint,
            tokens_dropped=dropped,
        )

    def material_problem(client: str, detail: str) -> None:
        log.warning("client_credentials_unreadable", client=client, detail=detail)

    material = ClientMaterial(
        rt.config.clients, on_change=material_changed, on_problem=material_problem
    )
    client = TokenClient(
        idp_session,
        material,
        timeout_s=settings.token_timeout_s,
        retries=settings.token_retries,
        discovery=Discovery(idp_session),
    )

    def fetched(key: CredentialKey, token: Token) -> None:
        rt.readiness.satisfy(rejected_condition(key.client))
        log.info(
            "token_fetched",
            client=key.client,
            scope=" ".join(key.scope) or None,
            audience=key.audience,
            resource=key.resource,
            lifetime_s=round(token.lifetime_s),
        )
        if token.clamped_from_s is not None:
            log.warning(
                "token_lifetime_clamped",
                client=key.client,
                expires_in_s=token.clamped_from_s,
                used_s=round(token.lifetime_s),
            )

    def failed(key: CredentialKey, exc: TokenError) -> None:
        if isinstance(exc, TokenRejectedError):
            # A configuration error: readiness says so until a fetch for the client works.
            rt.readiness.withdraw(rejected_condition(key.client))
            log.error(
                "token_fetch_failed",
                client=key.client,
                code=exc.code,
                oauth_error=exc.oauth_error,
                config_error=True,
                detail=exc.detail,
            )
        else:
            log.warning("token_fetch_failed", client=key.client, code=exc.code, detail=exc.detail)

    async def fetch(key: CredentialKey) -> TokenGrant:
        started = time.monotonic()
        try:
            grant = await client.fetch(key)
        except TokenError as exc:
            rt.metrics.token_request(key.client, _outcome(exc), time.monotonic() - started)
            raise
        rt.metrics.token_request(key.client, "success", time.monotonic() - started)
        return grant

    rt.tokens = TokenCache(
        fetch,
        clock=time.monotonic,
        skew_s=settings.token_skew_s,
        default_lifetime_s=settings.token_default_lifetime_s,
        failure_hold_s=settings.token_failure_hold_s,
        failure_hold_max_s=settings.token_failure_hold_max_s,
        on_fetched=fetched,
        on_failed=failed,
    )
    rt.gauges.token_expiry = rt.tokens.expiries
    clients = rt.config.clients
    prefetcher = Prefetcher(
        rt.tokens,
        (r.credential for r in rt.config.routes if clients[r.credential.client].prefetch),
        rt.readiness,
    )
    prefetcher.start()
    watcher = TaskSet()
    if material.has_files:
        watcher.start(material.watch(settings.credential_files_check_s), name="credential-files")
    rt.material = material
    yield
    await watcher.cancel_all()
    await prefetcher.close()
    await rt.tokens.close()
    await idp_session.close()


async def _proxy_listener(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    if rt.upstream is None or rt.tokens is None or rt.material is None or rt.egress is None:
        raise RuntimeError("the proxy listener needs the upstream and token cache started first")
    settings = rt.config.proxy
    forwarder = Forwarder(rt.upstream, rt.tokens, via=settings.name)
    routes = RouteTable(rt.config.routes)
    handler = ProxyHandler(
        routes,
        forwarder,
        settings,
        rt.logs.access,
        upstream_tls=rt.material.upstream_context,
        metrics=rt.metrics,
    )
    server = FrontDoor(
        handler,
        proxy_name=settings.name,
        log=rt.logs.events,
        header_timeout_s=settings.header_timeout_s,
        access_log=None,
        handler_cancellation=True,
        max_line_size=settings.max_uri_bytes,
        max_field_size=settings.max_header_bytes,
        max_headers=settings.max_header_count,
        keepalive_timeout=settings.client_idle_timeout_s,
    )
    leaves = None
    if settings.ca_cert_file is not None and settings.ca_key_file is not None:
        leaves = LeafCertificates(load_ca(settings.ca_cert_file, settings.ca_key_file))
    broker = TunnelBroker(
        routes=routes,
        settings=settings,
        front_door=server,
        leaves=leaves,
        log=rt.logs.events,
        metrics=rt.metrics,
        egress=rt.egress,
    )
    rt.gauges.open_connections = lambda: len(server.connections)
    rt.gauges.open_tunnels = broker.open_tunnels
    runner = web.ServerRunner(
        server, handle_signals=False, shutdown_timeout=settings.shutdown_grace_s
    )
    await runner.setup()
    site = ProxySite(
        runner,
        settings.listen,
        broker=broker,
        transparent=settings.transparent,
        log=rt.logs.events,
        first_bytes_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        if leaves is not None:
            leaves.close()
        raise
    rt.proxy_runner = runner
    rt.handler, rt.broker = handler, broker
    rt.egress.set_own([(settings.listen.host, site.port)])
    rt.proxy_port = site.port
    rt.readiness.satisfy(LISTENING)
    rt.logs.events.info(
        "proxy_started",
        listen=f"{settings.listen.host}:{rt.proxy_port}",
        routes=len(rt.config.routes),
        clients=len(rt.config.clients),
        config=rt.config.source,
    )
    yield
    rt.readiness.withdraw(LISTENING)
    # HTTP connections and tunnels share one grace period, running side by side.
    deadline = asyncio.get_running_loop().time() + settings.shutdown_grace_s
    await runner.cleanup()
    await site.drain(deadline - asyncio.get_running_loop().time())
    if leaves is not None:
        leaves.close()


def _outcome(exc: TokenError) -> str:
    """The token_requests outcome label of a failed fetch."""
    if isinstance(exc, TokenRejectedError):
        return "rejected"
    if isinstance(exc, TokenTimeoutError):
        return "timeout"
    if isinstance(exc, TokenResponseInvalidError):
        return "invalid"
    return "unavailable"


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the proxy listener has no bound address")


LIVE_SETTINGS = frozenset(
    {
        "unmatched",
        "connect_ports",
        "replay_body_limit_bytes",
        "body_timeout_s",
        "tunnel_idle_timeout_s",
        "tls_handshake_timeout_s",
    }
)
"""proxy settings a reload applies at once; the others are bound into sockets, sessions
or long-lived objects at start and wait for a restart."""


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    changed_clients: tuple[str, ...]
    """Clients added, changed or removed: their cached tokens were dropped."""
    restart_required: tuple[str, ...]
    """proxy settings that changed but apply only after a restart."""


def apply_config(rt: Runtime, new: Config) -> ReloadOutcome:
    """Swap a validated config into the running proxy, atomically for new requests.

    Requests and tunnels already running finish with what they matched; tokens of
    clients whose settings (secrets included) did not change are kept.
    """
    if rt.handler is None or rt.broker is None or rt.material is None or rt.tokens is None:
        raise RuntimeError("the proxy is not running")
    old = rt.config.proxy
    settings = replace(old, **{name: getattr(new.proxy, name) for name in LIVE_SETTINGS})
    restart = tuple(
        f.name
        for f in fields(ProxySettings)
        if f.name not in LIVE_SETTINGS and getattr(old, f.name) != getattr(new.proxy, f.name)
    )
    rt.logs.redactor.add(s for client in new.clients.values() for s in client.secrets)
    changed = rt.material.replace_clients(new.clients)
    for name in changed:
        if name in new.clients:
            rt.tokens.forget_client(name, rt.material.fingerprint(name))
        else:
            rt.tokens.flush(name)
    routes = RouteTable(new.routes)
    rt.handler.use(routes, settings)
    rt.broker.use(routes, settings)
    rt.config = replace(new, proxy=settings)
    return ReloadOutcome(tuple(changed), restart)


class ProxyServer:
    """The proxy and admin listeners as one startable, stoppable unit."""

    def __init__(self, config: Config, logs: Logs) -> None:
        self._config = config
        self._log = logs.events
        self._app = build_app(config, logs)
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        self.admin_port: int | None = None

    @property
    def runtime(self) -> Runtime:
        return self._app[RUNTIME]

    @property
    def proxy_port(self) -> int:
        port = self.runtime.proxy_port
        if port is None:
            raise RuntimeError("the proxy is not started")
        return port

    async def start(self) -> None:
        try:
            await self._runner.setup()
        except BaseException:
            await self._app.cleanup()  # stops, in reverse, whatever cleanup_ctx step started
            raise
        admin = self._config.proxy.admin_listen
        site = web.TCPSite(self._runner, admin.host, admin.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.admin_port = _bound_port(self._runner)
        self._log.info("admin_started", listen=f"{admin.host}:{self.admin_port}")

    def reload(self, path: str) -> bool:
        """Read ``path`` again and apply it if valid; True when applied. An invalid
        file changes nothing: every problem is logged with its file:line."""
        rt = self.runtime
        try:
            config = load_config(path)
        except ConfigError as exc:
            rt.metrics.reload("failure")
            self._log.error(
                "config_reload_failed",
                config=path,
                problems=[str(problem) for problem in exc.problems],
            )
            return False
        except Exception as exc:  # a reload must never stop the proxy
            rt.metrics.reload("failure")
            self._log.error("config_reload_failed", config=path, problems=[type(exc).__name__])
            return False
        outcome = apply_config(rt, config)
        rt.metrics.reload("success")
        self._log.info(
            "config_reloaded",
            config=path,
            routes=len(config.routes),
            clients=len(config.clients),
            changed_clients=list(outcome.changed_clients),
            restart_required=list(outcome.restart_required),
        )
        return True

    async def watch(self, path: str, interval_s: float = 1.0) -> None:
        """Reload whenever ``path`` changes on disk (a ConfigMap symlink swap
        included), checking every ``interval_s``; runs until cancelled."""
        last = stamp(path)
        while True:
            await asyncio.sleep(interval_s)
            current = stamp(path)
            if current != last and current is not None:
                last = current
                self.reload(path)

    async def stop(self) -> None:
        """Readiness goes false at once; in-flight requests get the grace period."""
        self._log.info("shutdown_started", grace_s=self._config.proxy.shutdown_grace_s)
        self.runtime.readiness.withdraw("shutting_down")
        await self._runner.cleanup()
        self.runtime.logs.access.flush()
        self._log.info("shutdown_completed")

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()


async def fetch_token(config: Config, spec: CredentialKey) -> TokenGrant:
    """One token request exactly as the running proxy would make it (``m2m-proxy token``)."""
    settings = config.proxy
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=settings.token_timeout_s),
        trust_env=False,
    ) as session:
        client = TokenClient(
            session,
            ClientMaterial(config.clients),
            timeout_s=settings.token_timeout_s,
            retries=settings.token_retries,
            discovery=Discovery(session),
        )
        return await client.fetch(spec)


async def serve(
    config: Config, logs: Logs, stop: asyncio.Event, *, path: str, watch: bool = False
) -> None:
    """Run the proxy and admin listeners until ``stop`` is set, then shut down.

    SIGHUP reloads ``path``; with ``watch``, so does a change of the file.
    """
    loop = asyncio.get_running_loop()
    async with ProxyServer(config, logs) as server:
        loop.add_signal_handler(signal.SIGHUP, server.reload, path)
        watcher = TaskSet()
        if watch:
            watcher.start(server.watch(path), name="config-watch")
        try:
            await stop.wait()
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            await watcher.cancel_all()
