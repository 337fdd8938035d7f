"""Memory bounds of a real m2m-proxy process (issue 7): a 1 GiB body streamed either way
adds < 50 MiB of RSS, a slow reader holds the upstream back instead of filling the proxy,
and 10,000 idle keep-alive clients cost < 20 KiB each.

Each test starts its own ``python -m m2m_proxy run`` (so the RSS is the proxy's alone),
whose route gets its token from the session's dev IdP; the upstream is bench/memory.py's
raw asyncio server in its own process (bodies generated on the fly, uploads CRC-checked
and counted, never kept). The proxy's VmRSS is sampled every 50 ms and its VmHWM, reset
before each measure, read after it. bench/memory.py runs the same measures at full size
with both event loops and prints the figures.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dev_stack import DevStack

from tests.functional.conftest import RESOURCE
from tests.functional.support import SENTINEL_SECRET

sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))
import memory  # bench/memory.py, on the path just above

GIB = 1024 * memory.MIB
SLOW_SIZE = 128 * memory.MIB  # more than the bound: buffering it would show
SLOW_RATE = 64 * memory.MIB  # the upstream could send ~1 GiB/s: 15x faster
IDLE = 10_000


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    with memory.upstream_process() as port:
        yield port


@pytest.fixture
def proxy(stack: DevStack, upstream_port: int, tmp_path: Path) -> Iterator[memory.ProxyProcess]:
    """A fresh, warmed-up proxy process on uvloop (the default loop)."""
    creds = memory.Credentials(stack.token_url, "svc-basic", SENTINEL_SECRET, RESOURCE)
    with memory.proxy_process(creds, upstream_port, tmp_path) as running:
        assert running.loop == "uvloop"
        yield running


def _assert_bounded(result: memory.StreamMeasure) -> None:
    assert result.samples >= 5, "RSS was not sampled during the transfer"
    assert result.added_mib < memory.STREAM_TARGET_MIB, (
        f"{result.name}: RSS {result.baseline_kib} KiB -> peak {result.peak_kib} KiB "
        f"(+{result.added_mib:.1f} MiB) for {result.size >> 20} MiB"
    )


def test_a_1gib_download_adds_less_than_50mib(proxy: memory.ProxyProcess) -> None:
    _assert_bounded(memory.measure_stream(proxy, memory.StreamSpec("download", GIB, "download")))


def test_a_1gib_upload_adds_less_than_50mib(proxy: memory.ProxyProcess) -> None:
    _assert_bounded(memory.measure_stream(proxy, memory.StreamSpec("upload", GIB, "upload")))


def test_a_slow_reader_holds_the_upstream_back(proxy: memory.ProxyProcess) -> None:
    """The client reads nothing for 1 s, then 64 MiB/s: a proxy that kept reading the
    upstream at its own speed would hold most of the 128 MiB at once."""
    spec = memory.StreamSpec("slow reader", SLOW_SIZE, "download", rate=SLOW_RATE, stall_s=1.0)
    _assert_bounded(memory.measure_stream(proxy, spec))


def test_an_upload_to_a_slow_upstream_holds_the_client_back(
    proxy: memory.ProxyProcess,
) -> None:
    spec = memory.StreamSpec("upload, slow upstream", SLOW_SIZE, "upload", rate=SLOW_RATE)
    _assert_bounded(memory.measure_stream(proxy, spec))


def test_10000_idle_keepalive_clients_cost_less_than_20kib_each(
    proxy: memory.ProxyProcess,
) -> None:
    result = memory.measure_idle(proxy, IDLE)
    assert result.fds_added >= IDLE, "not every client connection stayed open"
    assert result.rechecked == IDLE // 100
    assert result.per_connection_kib < memory.IDLE_TARGET_KIB, (
        f"RSS {result.baseline_kib} KiB -> {result.after_kib} KiB with {IDLE} idle clients: "
        f"{result.per_connection_kib:.2f} KiB each"
    )
