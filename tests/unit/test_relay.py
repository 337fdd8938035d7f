"""Tunnel: a blind byte relay between a real client socket and a real upstream server.

Every test runs twice, on the default asyncio loop and on uvloop (the proxy's loop),
each in its own ``asyncio.Runner`` (pytest-asyncio can only switch loops from a
conftest hook). After each test no task is left and the process has as many open
fds as before; ``Ends.finish`` checks that run() closed both relayed sockets
before returning.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop

from m2m_proxy.errors import UpstreamTimeoutError, UpstreamUnreachableError
from m2m_proxy.relay import RelayStats, Tunnel

MiB = 1024 * 1024
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

Scenario = Callable[[], Coroutine[Any, Any, None]]


def open_sockets() -> int:
    """Sockets this process has open (loops also keep pipes, eventfds and /dev/null)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd of the listing itself
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Scenario], None]]:
    """Run a scenario on the parametrized loop, then check it leaked no task and no fd."""

    async def checked(scenario: Scenario) -> None:
        sockets = open_sockets()
        await scenario()
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert open_sockets() == sockets

    with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
        yield lambda scenario: runner.run(checked(scenario))


@dataclass
class Stream:
    """One test-owned end: the client, or the upstream server's accepted connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def wrap(cls, sock: socket.socket) -> Stream:
        return cls(*await asyncio.open_connection(sock=sock))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_eof(self, data: bytes = b"") -> None:
        await self.send(data)
        self.writer.write_eof()

    async def read_all(self) -> bytes:
        return await self.reader.read()

    def reset(self) -> None:
        sock = self.writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Ends:
    tunnel: Tunnel
    client: Stream
    upstream: Stream
    relay_end: socket.socket
    test_owned: tuple[socket.socket, ...]  # the client's end and the upstream's accepted one
    sockets_before: int  # open before any of the above
    idle_timeout_s: float
    tasks: asyncio.TaskGroup
    relay: asyncio.Task[RelayStats] | None = None

    def start(self) -> None:
        self.relay = self.tasks.create_task(
            self.tunnel.run(self.relay_end, idle_timeout_s=self.idle_timeout_s)
        )

    async def finish(self) -> RelayStats:
        """Wait for run(); check it closed both relayed sockets before returning."""
        assert self.relay is not None
        stats = await self.relay
        assert self.relay_end.fileno() == -1
        still_open = sum(sock.fileno() != -1 for sock in self.test_owned)
        assert open_sockets() == self.sockets_before + still_open  # the upstream one is closed
        return stats


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(accepted, connected): a loopback TCP connection, as the proxy's listener gets it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        connected = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    accepted.setblocking(False)
    connected.setblocking(False)
    return accepted, connected


@contextlib.asynccontextmanager
async def tunnel(*, idle_timeout_s: float = 10.0, start: bool = True) -> AsyncIterator[Ends]:
    """A Tunnel from a loopback client to an upstream server on 127.0.0.1 port 0."""
    loop = asyncio.get_running_loop()
    sockets_before = open_sockets()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        tun = await Tunnel.connect("127.0.0.1", server.getsockname()[1], connect_timeout_s=5.0)
        conn, _ = await loop.sock_accept(server)
    upstream = await Stream.wrap(conn)
    relay_end, client_end = tcp_pair()
    client = await Stream.wrap(client_end)
    ends: Ends | None = None
    try:
        async with asyncio.TaskGroup() as tasks:
            ends = Ends(
                tun,
                client,
                upstream,
                relay_end,
                (client_end, conn),
                sockets_before,
                idle_timeout_s,
                tasks,
            )
            if start:
                ends.start()
            yield ends
    finally:
        if ends is None or ends.relay is None:  # never ran: release what run() would own
            tun.abort()
            relay_end.close()
        await client.close()
        await upstream.close()


def chunks(data: bytes, rng: random.Random, largest: int) -> Iterator[bytes]:
    view = memoryview(data)
    while view:
        size = rng.randint(1, largest)
        yield bytes(view[:size])
        view = view[size:]


async def send_in_chunks(stream: Stream, data: bytes, seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - chunk sizes, not secrets
    for chunk in chunks(data, rng, largest=200_000):
        stream.writer.write(chunk)
        if rng.random() < 0.5:
            await stream.writer.drain()
        if rng.random() < 0.1:
            await asyncio.sleep(0)  # let the other direction interleave
    await stream.writer.drain()
    stream.writer.write_eof()


async def expect_reset(stream: Stream) -> None:
    """The peer reset the connection: reading fails instead of ending with a clean EOF."""
    with pytest.raises(ConnectionResetError):
        while await stream.reader.read(MiB):
            pass


def test_bytes_arrive_exactly_in_both_directions(run: Callable[[Scenario], None]) -> None:
    up, down = os.urandom(5 * MiB + 17), os.urandom(3 * MiB + 5)

    async def scenario() -> None:
        async with tunnel() as ends, asyncio.TaskGroup() as tg:
            tg.create_task(send_in_chunks(ends.client, up, seed=1))
            tg.create_task(send_in_chunks(ends.upstream, down, seed=2))
            got_up = tg.create_task(ends.upstream.read_all())
            got_down = tg.create_task(ends.client.read_all())
            stats = await ends.finish()
        assert got_up.result() == up
        assert got_down.result() == down
        assert (stats.bytes_up, stats.bytes_down) == (len(up), len(down))
        assert stats.closed_by in {"client", "upstream"}

    run(scenario)


def test_client_half_close_still_receives_the_reply(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with tunnel() as ends:
            await ends.client.send_eof(b"request")
            assert await ends.upstream.read_all() == b"request"  # the EOF got through
            await ends.upstream.send_eof(b"the reply")
            assert await ends.client.read_all() == b"the reply"
            stats = await ends.finish()
        assert (stats.bytes_up, stats.bytes_down, stats.closed_by) == (7, 9, "client")

    run(scenario)


def test_upstream_half_close_still_receives_the_request(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with tunnel() as ends:
            await ends.upstream.send_eof(b"greeting")
            assert await ends.client.read_all() == b"greeting"
            await ends.client.send_eof(b"request")
            assert await ends.upstream.read_all() == b"request"
            stats = await ends.finish()
        assert (stats.bytes_up, stats.bytes_down, stats.closed_by) == (7, 8, "upstream")

    run(scenario)


def test_bytes_sent_before_run_are_relayed(run: Callable[[Scenario], None]) -> None:
    """The client spoke first (unread in its socket); the upstream greeted and closed."""

    async def scenario() -> None:
        async with tunnel(start=False) as ends:
            await ends.client.send(b"early bytes")
            await ends.upstream.send_eof(b"greeting")
            await asyncio.sleep(0.05)  # both arrive before the client joins
            ends.start()
            assert await ends.client.read_all() == b"greeting"
            await ends.client.send_eof(b", then more")
            assert await ends.upstream.read_all() == b"early bytes, then more"
            stats = await ends.finish()
        assert (stats.bytes_up, stats.bytes_down, stats.closed_by) == (22, 8, "upstream")

    run(scenario)


def test_upstream_is_not_read_before_the_client_joins(run: Callable[[Scenario], None]) -> None:
    """A chatty upstream cannot fill the proxy's memory while the client is being answered."""
    payload = os.urandom(8 * MiB)

    async def scenario() -> None:
        async with tunnel(start=False) as ends:
            ends.upstream.writer.write(payload)  # no drain: the upstream's own buffer holds it
            ends.upstream.writer.write_eof()
            await asyncio.sleep(0.1)
            assert ends.tunnel.buffered_bytes < MiB
            ends.start()
            assert await ends.client.read_all() == payload
            await ends.client.send_eof()
            assert await ends.upstream.read_all() == b""
            stats = await ends.finish()
        assert (stats.bytes_up, stats.bytes_down, stats.closed_by) == (0, len(payload), "upstream")

    run(scenario)


def test_upstream_reset_resets_the_client(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with tunnel() as ends:
            await ends.client.send(b"ping")
            assert await ends.upstream.reader.readexactly(4) == b"ping"
            ends.upstream.reset()
            await expect_reset(ends.client)
            stats = await ends.finish()
        assert (stats.bytes_up, stats.closed_by) == (4, "error")

    run(scenario)


def test_client_reset_resets_the_upstream(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with tunnel() as ends:
            await ends.upstream.send(b"pong")
            assert await ends.client.reader.readexactly(4) == b"pong"
            ends.client.reset()
            await expect_reset(ends.upstream)
            stats = await ends.finish()
        assert (stats.bytes_down, stats.closed_by) == (4, "error")

    run(scenario)


def test_reset_after_half_close_resets_the_other_side(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with tunnel() as ends:
            await ends.client.send_eof(b"request")
            assert await ends.upstream.read_all() == b"request"
            ends.upstream.reset()
            await expect_reset(ends.client)
            assert (await ends.finish()).closed_by == "error"

    run(scenario)


def test_idle_tunnel_is_reset_after_the_idle_timeout(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with tunnel(idle_timeout_s=0.2) as ends:
            await expect_reset(ends.client)
            await expect_reset(ends.upstream)
            stats = await ends.finish()
        assert stats.closed_by == "idle_timeout"
        assert 0.19 <= stats.duration_s < 1.0

    run(scenario)


def test_traffic_in_one_direction_keeps_the_tunnel_open(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with tunnel(idle_timeout_s=0.3) as ends:
            assert ends.relay is not None
            for _ in range(10):  # 1 s of traffic, one byte every 0.1 s
                await ends.client.send(b".")
                assert await ends.upstream.reader.readexactly(1) == b"."
                await asyncio.sleep(0.1)
            assert not ends.relay.done()
            stats = await ends.finish()
        assert (stats.bytes_up, stats.closed_by) == (10, "idle_timeout")
        assert 1.2 <= stats.duration_s < 2.5

    run(scenario)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_slow_reader_bounds_the_proxy_buffers(
    run: Callable[[Scenario], None], direction: str
) -> None:
    """64 MiB into a reader taking 64 KiB per ms: the proxy never holds more than ~1 MiB."""
    total, block = 64 * MiB, os.urandom(MiB)

    async def scenario() -> None:
        samples: list[int] = []
        async with tunnel() as ends:
            sender, reader = (
                (ends.client, ends.upstream)
                if direction == "up"
                else (
                    ends.upstream,
                    ends.client,
                )
            )

            async def send() -> None:
                for _ in range(total // MiB):
                    await sender.send(block)
                sender.writer.write_eof()

            async def read_slowly() -> int:
                received = 0
                while data := await reader.reader.read(64 * 1024):
                    received += len(data)
                    await asyncio.sleep(0.001)
                await reader.send_eof()
                return received

            async def sample() -> None:
                while ends.relay is not None and not ends.relay.done():
                    samples.append(ends.tunnel.buffered_bytes)
                    await asyncio.sleep(0.002)

            async with asyncio.TaskGroup() as tg:
                tg.create_task(send())
                received = tg.create_task(read_slowly())
                tg.create_task(sample())
                stats = await ends.finish()
        assert received.result() == total
        assert (stats.bytes_up if direction == "up" else stats.bytes_down) == total
        assert len(samples) > 100
        assert max(samples) > 0  # the slow reader did make the proxy buffer
        assert max(samples) < MiB

    run(scenario)


def test_abort_during_a_transfer_resets_both_sides(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with tunnel() as ends:

            async def stream_forever() -> None:
                with pytest.raises(ConnectionError):  # reset or broken pipe
                    while True:
                        await ends.client.send(bytes(64 * 1024))

            async with asyncio.TaskGroup() as tg:
                tg.create_task(stream_forever())
                assert len(await ends.upstream.reader.readexactly(MiB)) == MiB
                ends.tunnel.abort()
                await expect_reset(ends.upstream)
                stats = await ends.finish()
        assert stats.closed_by == "aborted"
        assert stats.bytes_up >= MiB
        assert stats.bytes_down == 0

    run(scenario)


def test_abort_before_run_resets_both_sides(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with tunnel(start=False) as ends:
            ends.tunnel.abort()
            ends.start()
            stats = await ends.finish()
            await expect_reset(ends.client)
            await expect_reset(ends.upstream)
        assert (stats.bytes_up, stats.bytes_down, stats.closed_by) == (0, 0, "aborted")

    run(scenario)


def test_cancelled_run_resets_both_sides_and_reraises(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with tunnel() as ends:
            assert ends.relay is not None
            await ends.client.send(b"ping")
            assert await ends.upstream.reader.readexactly(4) == b"ping"
            ends.relay.cancel()
            with pytest.raises(asyncio.CancelledError):
                await ends.relay
            await expect_reset(ends.client)
            await expect_reset(ends.upstream)

    run(scenario)


def test_run_twice_is_refused(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with tunnel() as ends:
            await ends.client.send(b"ping")
            assert await ends.upstream.reader.readexactly(4) == b"ping"  # run() is running
            spare, other = tcp_pair()
            other.close()
            with pytest.raises(RuntimeError, match="only once"):
                await ends.tunnel.run(spare, idle_timeout_s=1.0)
            spare.close()
            ends.tunnel.abort()
            assert (await ends.finish()).closed_by == "aborted"

    run(scenario)


def test_connect_to_a_closed_port_is_unreachable(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as closed:
            port = closed.getsockname()[1]
        loop = asyncio.get_running_loop()
        started_s = loop.time()
        with pytest.raises(UpstreamUnreachableError) as caught:
            await Tunnel.connect("127.0.0.1", port, connect_timeout_s=5.0)
        assert loop.time() - started_s < 1.0
        assert caught.value.detail == f"cannot connect to 127.0.0.1:{port} (Connection refused)"
        assert caught.value.status == 502

    run(scenario)


def test_connect_to_an_unresolvable_host_is_unreachable(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        try:
            await Tunnel.connect("no-such-host.invalid", 443, connect_timeout_s=3.0)
        except UpstreamTimeoutError:
            pytest.skip("the resolver did not answer in time (offline)")
        except UpstreamUnreachableError as exc:
            assert exc.detail.startswith("cannot connect to no-such-host.invalid:443 (")
        else:
            pytest.fail("an .invalid host resolved")

    run(scenario)


def test_connect_timeout_when_the_upstream_never_answers(run: Callable[[Scenario], None]) -> None:
    """A listener whose accept queue is full drops further SYNs: connect() hangs."""

    async def scenario() -> None:
        with contextlib.ExitStack() as stack:
            listener = stack.enter_context(socket.socket())
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            for _ in range(8):  # fill the accept queue until a connect stalls
                filler = stack.enter_context(socket.socket())
                filler.settimeout(0.2)
                try:
                    filler.connect(listener.getsockname())
                except TimeoutError:
                    break
            else:
                pytest.skip("the kernel accepted every connection: no full backlog here")
            port = listener.getsockname()[1]
            loop = asyncio.get_running_loop()
            started_s = loop.time()
            with pytest.raises(UpstreamTimeoutError) as caught:
                await Tunnel.connect("127.0.0.1", port, connect_timeout_s=0.2)
            assert 0.19 <= loop.time() - started_s < 1.0
        assert caught.value.detail == f"timed out connecting to 127.0.0.1:{port} after 0.2 s"
        assert caught.value.status == 504

    run(scenario)


def test_ipv6_authority_is_bracketed_in_errors(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        with pytest.raises(UpstreamUnreachableError, match=r"cannot connect to \[::1\]:1 \("):
            await Tunnel.connect("::1", 1, connect_timeout_s=2.0)

    run(scenario)


def test_a_client_that_closed_before_the_late_reply_ends_as_client(
    run: Callable[[Scenario], None],
) -> None:
    """The client closes fully; the upstream's late reply makes the client's kernel reset,
    so passing the upstream's EOF on fails: that is still a clean end by the client."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            await asyncio.sleep(0.05)
            writer.write(b"late answer")
            await asyncio.sleep(0.05)
            writer.close()

        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        listening = socket.create_server(("127.0.0.1", 0))
        listening.setblocking(False)
        client = socket.create_connection(listening.getsockname())
        accepted, _ = await loop.sock_accept(listening)
        accepted.setblocking(False)
        port = server.sockets[0].getsockname()[1]
        relay = await Tunnel.connect("127.0.0.1", port, connect_timeout_s=2)
        client.sendall(b"hello")
        client.close()
        stats = await relay.run(accepted, idle_timeout_s=5)
        server.close()
        await server.wait_closed()
        listening.close()
        assert (stats.bytes_up, stats.bytes_down, stats.closed_by) == (5, 11, "client")

    run(scenario)
