"""Metrics: counted in plain dicts on the hot path, rendered for Prometheus on scrape.

prometheus-client's labelled children cost a lock and several calls per update; a
proxy updates half a dozen series per request. Here a request costs a few dict
increments and one ``bisect`` per histogram, and :class:`MetricsCollector` turns the
counts into metric families when ``/metrics`` is scraped, in the one
``CollectorRegistry`` the app owns. Gauges that describe state (open connections,
seconds until token expiry) are read from their owners at scrape time.

Labels are bounded: route and client names come from the config, methods outside the
standard set are ``other``, statuses are classes (``2xx``), error kinds are codes.
No host, path, address or token ever becomes a label.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
FETCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_REASONS = 32
"""Distinct handshake-failure reasons kept; more are counted as ``other``."""


class Histogram:
    """Bucket counts for one label set; ``observe`` is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


_STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")


def _status_class(status: int) -> str:
    return _STATUS_CLASSES[status // 100] if 100 <= status < 600 else "other"


@dataclass
class Metrics:
    """Every count the proxy keeps. Updated by its owners, read by the collector."""

    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)
    durations: dict[str, Histogram] = field(default_factory=dict)
    added: dict[str, Histogram] = field(default_factory=dict)
    lookups: dict[str, int] = field(default_factory=dict)
    replays: dict[str, int] = field(default_factory=dict)
    upstream_errors: dict[str, int] = field(default_factory=dict)
    token_requests: dict[tuple[str, str], int] = field(default_factory=dict)
    token_fetch: dict[str, Histogram] = field(default_factory=dict)
    tunnels: dict[str, int] = field(default_factory=dict)
    tunnel_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    certificates_minted: int = 0
    handshake_failures: dict[str, int] = field(default_factory=dict)
    reloads: dict[str, int] = field(default_factory=dict)

    def request_completed(
        self,
        *,
        route: str,
        method: str,
        status: int,
        duration_s: float,
        added_s: float,
        token: str,
        replayed: str,
        error: str | None,
    ) -> None:
        key = (route, method if method in METHODS else "other", _status_class(status))
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        durations = self.durations.get(route)
        if durations is None:
            durations = self.durations[route] = Histogram(REQUEST_BUCKETS)
        durations.counts[bisect.bisect_left(REQUEST_BUCKETS, duration_s)] += 1
        durations.total += duration_s
        added = self.added.get(route)
        if added is None:
            added = self.added[route] = Histogram(ADDED_BUCKETS)
        added_s = max(added_s, 0.0)
        added.counts[bisect.bisect_left(ADDED_BUCKETS, added_s)] += 1
        added.total += added_s
        if token != "none":
            self.lookups[token] = self.lookups.get(token, 0) + 1
        if replayed != "no":
            self.replays[replayed] = self.replays.get(replayed, 0) + 1
        if error is not None and error.startswith("upstream_"):
            kind = error.partition(":")[0]
            self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1

    def token_request(self, client: str, outcome: str, duration_s: float) -> None:
        """``outcome``: success, unavailable, timeout, rejected or invalid."""
        key = (client, outcome)
        self.token_requests[key] = self.token_requests.get(key, 0) + 1
        histogram = self.token_fetch.get(client)
        if histogram is None:
            histogram = self.token_fetch[client] = Histogram(FETCH_BUCKETS)
        histogram.observe(duration_s)

    def tunnel_opened(self, mode: str) -> None:
        self.tunnels[mode] = self.tunnels.get(mode, 0) + 1

    def tunnel_closed(self, mode: str, bytes_up: int, bytes_down: int) -> None:
        for direction, count in (("up", bytes_up), ("down", bytes_down)):
            key = (mode, direction)
            self.tunnel_bytes[key] = self.tunnel_bytes.get(key, 0) + count

    def handshake_failed(self, reason: str) -> None:
        if reason not in self.handshake_failures and len(self.handshake_failures) >= MAX_REASONS:
            reason = "other"
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    def reload(self, outcome: str) -> None:
        self.reloads[outcome] = self.reloads.get(outcome, 0) + 1


@dataclass
class Gauges:
    """State read at scrape time from its owners (set by the app as they start)."""

    open_connections: Callable[[], int] = lambda: 0
    open_tunnels: Callable[[], Mapping[str, int]] = dict
    token_expiry: Callable[[], Mapping[str, float]] = dict
    """Per client: seconds until its soonest-expiring cached token expires."""


class MetricsCollector(Collector):
    def __init__(self, metrics: Metrics, gauges: Gauges) -> None:
        self._m = metrics
        self._g = gauges

    def collect(self) -> Iterator[Metric]:
        m = self._m
        requests = CounterMetricFamily(
            "m2m_proxy_requests",
            "Requests handled, by route, method and status class.",
            labels=["route", "method", "status_class"],
        )
        for (route, method, status), count in m.requests.items():
            requests.add_metric([route, method, status], count)
        yield requests
        yield _histograms(
            "m2m_proxy_request_duration_seconds",
            "Time from request to the end of the response, by route.",
            m.durations,
        )
        yield _histograms(
            "m2m_proxy_added_latency_seconds",
            "Time the proxy itself added before the response started: not spent waiting "
            "for the upstream or the IdP.",
            m.added,
        )
        yield _counter(
            "m2m_proxy_token_cache_lookups",
            "Token cache lookups by outcome (hit, miss, refresh_ahead).",
            "outcome",
            m.lookups,
        )
        yield _counter(
            "m2m_proxy_replays",
            "401 replays by outcome (recovered, still_401, not_replayable).",
            "outcome",
            m.replays,
        )
        yield _counter(
            "m2m_proxy_upstream_errors",
            "Upstream failures by kind (error code).",
            "kind",
            m.upstream_errors,
        )
        token_requests = CounterMetricFamily(
            "m2m_proxy_token_requests",
            "Token fetches by client and outcome (success, unavailable, timeout, "
            "rejected, invalid).",
            labels=["client", "outcome"],
        )
        for (client, outcome), count in m.token_requests.items():
            token_requests.add_metric([client, outcome], count)
        yield token_requests
        yield _histograms(
            "m2m_proxy_token_fetch_duration_seconds",
            "Duration of token fetches (retries included), by client.",
            m.token_fetch,
            label="client",
        )
        expiry = GaugeMetricFamily(
            "m2m_proxy_token_expiry_seconds",
            "Seconds until the soonest-expiring cached token of each client expires.",
            labels=["client"],
        )
        for client, seconds in self._g.token_expiry().items():
            expiry.add_metric([client], seconds)
        yield expiry
        yield GaugeMetricFamily(
            "m2m_proxy_open_connections",
            "Client HTTP connections open (intercepted tunnels included).",
            value=self._g.open_connections(),
        )
        yield _gauge(
            "m2m_proxy_open_tunnels", "Blind tunnels open, by mode.", "mode", self._g.open_tunnels()
        )
        yield _counter("m2m_proxy_tunnels", "Tunnels opened, by mode.", "mode", m.tunnels)
        tunnel_bytes = CounterMetricFamily(
            "m2m_proxy_tunnel_bytes",
            "Bytes relayed by blind tunnels, by mode and direction (up: client to upstream).",
            labels=["mode", "direction"],
        )
        for (mode, direction), count in m.tunnel_bytes.items():
            tunnel_bytes.add_metric([mode, direction], count)
        yield tunnel_bytes
        yield CounterMetricFamily(
            "m2m_proxy_certificates_minted",
            "Leaf certificates minted for intercepted hosts.",
            value=m.certificates_minted,
        )
        yield _counter(
            "m2m_proxy_tls_handshake_failures",
            "Failed TLS handshakes with clients inside CONNECT, by reason.",
            "reason",
            m.handshake_failures,
        )
        yield _counter(
            "m2m_proxy_config_reloads",
            "Routes-file reloads by outcome (success, failure).",
            "outcome",
            m.reloads,
        )


def make_registry(metrics: Metrics, gauges: Gauges) -> CollectorRegistry:
    """The app's one registry (no process or platform collectors: no global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(metrics, gauges))
    return registry


def _counter(name: str, doc: str, label: str, values: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in values.items():
        family.add_metric([value], count)
    return family


def _gauge(name: str, doc: str, label: str, values: Mapping[str, int]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for value, count in values.items():
        family.add_metric([value], count)
    return family


def _histograms(
    name: str, doc: str, histograms: Mapping[str, Histogram], *, label: str = "route"
) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, histogram in histograms.items():
        family.add_metric([value], histogram.cumulative(), histogram.total)
    return family
