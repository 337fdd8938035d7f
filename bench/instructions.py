"""Deterministic CPU cost for `bench/run.py --instructions`: instructions per request, counted
by valgrind's callgrind in a proxy process.

The proxy runs under ``valgrind --tool=callgrind --instr-atstart=no`` (full speed of the
valgrind core while it starts and warms up, nothing counted). Then, per measurement:
``callgrind_control --instr=on``, a few hundred uncounted requests more, ``--zero``, exactly N
identical requests over a few keep-alive connections (each checked: 200 from the demo API for
our client), ``--dump``; the dump's ``summary:`` line is the proxy's user-space instructions
(Ir) for those N requests, in all its threads. Instruction counts do not depend on how busy the
machine is, which throughput and CPU time on a shared VM do.

This module knows nothing about the dev stack: callgrind_run.py starts the processes and calls
:func:`measure_process`.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VALGRIND_OPTIONS = (
    "--tool=callgrind",
    "--instr-atstart=no",  # no counting (and a 5x faster start) until callgrind_control -i on
    "--dump-instr=no",
    "--compress-strings=no",  # plain function names in every line: simpler to parse
    "--compress-pos=no",
)
CONTROL_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0  # one request to a proxy under callgrind, which is ~40x slower


class InstructionsError(RuntimeError):
    """The measurement could not be made; the message says why."""


def valgrind_argv(out_file: Path) -> list[str]:
    """The prefix that starts a command under callgrind, dumps going to ``out_file.N``."""
    valgrind = shutil.which("valgrind")
    if valgrind is None or shutil.which("callgrind_control") is None:
        raise InstructionsError(
            "valgrind is not installed (Debian/Ubuntu: apt-get install valgrind)"
        )
    return [valgrind, *VALGRIND_OPTIONS, f"--callgrind-out-file={out_file}"]


# -- the load: exactly N requests --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """One request form, sent as exactly these bytes to 127.0.0.1:port."""

    key: str
    name: str
    port: int
    request: bytes


def get_request(target: str, host: str) -> bytes:
    """A GET as wrk sends it: request line and Host, nothing else (keep-alive is implied)."""
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("ascii")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"connection", b"").lower() == b"close":
        raise InstructionsError(f"the server closed a keep-alive connection: {head!r}")
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"]))
    if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
        raise InstructionsError(f"response without length: {head!r}")
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, bytes(body)
        body += chunk[:-2]


def _check(load: Load, status: int, body: bytes, client_id: str) -> None:
    try:
        answer: Any = json.loads(body)
    except ValueError:
        answer = None
    if status != 200 or not isinstance(answer, dict) or answer.get("client_id") != client_id:
        raise InstructionsError(f"{load.key} {load.name}: {status} {body[:300]!r}")


async def _session(
    load: Load,
    count: int,
    connections: int,
    client_id: str,
    *,
    start: Callable[[], None],
    stop: Callable[[], None],
) -> float:
    opened = [await asyncio.open_connection("127.0.0.1", load.port) for _ in range(connections)]
    remaining = count

    async def one(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        reader, writer = stream
        writer.write(load.request)
        status, body = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT_S)
        _check(load, status, body, client_id)

    async def worker(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one(stream)

    try:
        # One request per connection first: the proxy has accepted every connection (and
        # finished with the previous batch's) before the counting starts.
        await asyncio.gather(*(one(stream) for stream in opened))
        start()
        started = time.monotonic()
        # gather: the first failure propagates as itself; asyncio.run cancels the others.
        await asyncio.gather(*(worker(stream) for stream in opened))
        wall = time.monotonic() - started
        stop()
        return wall
    finally:
        for _, writer in opened:
            writer.close()


def send(
    load: Load,
    count: int,
    connections: int,
    client_id: str,
    *,
    start: Callable[[], None] = lambda: None,
    stop: Callable[[], None] = lambda: None,
) -> float:
    """Open ``connections`` keep-alive connections and send one request on each, call
    ``start``, send exactly ``count`` requests over them, call ``stop``, close them. Only the
    ``count`` requests fall between ``start`` and ``stop``: no connection setup or teardown.
    Every answer must be a 200 from the demo API for ``client_id``. Returns the wall time
    between ``start`` and ``stop`` in seconds."""
    try:
        return asyncio.run(_session(load, count, connections, client_id, start=start, stop=stop))
    except TimeoutError:
        raise InstructionsError(f"{load.key} {load.name}: no answer in time") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
        raise InstructionsError(f"{load.key} {load.name}: {err!r}") from None


# -- callgrind ---------------------------------------------------------------------------------


_SUMMARY = re.compile(r"^summary:\s+(\d+)", re.MULTILINE)


class Callgrind:
    """callgrind_control for one process started with :func:`valgrind_argv` (``out_file``)."""

    def __init__(self, pid: int, out_file: Path) -> None:
        self.pid = pid
        self.out_file = out_file
        self.dumps = 0

    def _control(self, *options: str) -> None:
        argv = ["callgrind_control", *options, str(self.pid)]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=CONTROL_TIMEOUT_S, check=False
        )
        if result.returncode != 0 or "OK." not in result.stdout:
            raise InstructionsError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")

    def instrument(self, on: bool) -> None:
        self._control(f"--instr={'on' if on else 'off'}")

    def zero(self) -> None:
        self._control("--zero")

    def dump(self, label: str) -> Path:
        """Write the counts since the last zero/dump to ``out_file.N``; returns that file."""
        self._control(f"--dump={label}")
        self.dumps += 1
        path = Path(f"{self.out_file}.{self.dumps}")
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        while not (path.exists() and f"Trigger: dump {label}" in path.read_text(errors="replace")):
            if time.monotonic() > deadline:
                raise InstructionsError(f"callgrind did not write {path} for dump {label!r}")
            time.sleep(0.05)
        return path


def total_ir(dump: Path) -> int:
    found = _SUMMARY.search(dump.read_text(encoding="utf-8", errors="replace"))
    if found is None:
        raise InstructionsError(f"no summary line in {dump}")
    return int(found.group(1))


# -- one process -------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    ir: int
    requests: int
    wall_s: float
    dump: Path

    @property
    def ir_per_request(self) -> float:
        return self.ir / self.requests


@dataclass(slots=True)
class Measured:
    load: Load
    samples: list[Sample] = field(default_factory=list)

    @property
    def ir_per_request(self) -> float:
        """Mean over the samples (they agree to well under 1 %)."""
        return sum(s.ir_per_request for s in self.samples) / len(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / mean of the samples' Ir per request."""
        values = [s.ir_per_request for s in self.samples]
        return (max(values) - min(values)) / self.ir_per_request


@dataclass(frozen=True, slots=True)
class Plan:
    requests: int  # N per sample
    samples: int  # per load
    connections: int
    warmup: int  # uncounted requests per load, before and again after instrumentation is on
    idle_s: float  # counted idle time after the samples (timers, housekeeping)
    client_id: str


@dataclass(slots=True)
class ProcessResult:
    measured: list[Measured]
    idle_ir: int
    idle_s: float
    idle_dump: Path

    @property
    def idle_ir_per_s(self) -> float:
        return self.idle_ir / self.idle_s


def _counted(grind: Callgrind, load: Load, plan: Plan, label: str) -> Sample:
    """One sample: zero, ``plan.requests`` requests, dump."""
    dumps: list[Path] = []

    def stop() -> None:
        dumps.append(grind.dump(label))

    wall = send(load, plan.requests, plan.connections, plan.client_id, start=grind.zero, stop=stop)
    return Sample(total_ir(dumps[0]), plan.requests, wall, dumps[0])


def measure_process(
    pid: int,
    out_file: Path,
    loads: Sequence[Load],
    plan: Plan,
    *,
    log: Callable[[str], None] = print,
    alive: Callable[[], None] = lambda: None,
) -> ProcessResult:
    """Warm up, then ``plan.samples`` counted batches of ``plan.requests`` per load (loads
    interleaved), then the idle baseline. ``alive`` raises if something died."""
    grind = Callgrind(pid, out_file)
    for load in loads:  # token fetched and cached, upstream connections pooled, code imported
        send(load, plan.warmup, plan.connections, plan.client_id)
    alive()
    grind.instrument(True)
    for load in loads:  # the same once more with instrumentation on (translations made)
        send(load, plan.warmup, plan.connections, plan.client_id)
    alive()
    measured = [Measured(load) for load in loads]
    for rnd in range(1, plan.samples + 1):
        for m in measured:
            sample = _counted(grind, m.load, plan, f"{m.load.key}-{rnd}")
            m.samples.append(sample)
            alive()
            log(
                f"bench: {m.load.key} {m.load.name:<12} sample {rnd}/{plan.samples}: "
                f"{sample.ir_per_request:>12,.0f} Ir/request  ({plan.requests} requests, "
                f"{sample.wall_s:.1f} s under callgrind)"
            )
    time.sleep(0.5)  # the last batch's connections closed: not part of the idle baseline
    grind.zero()
    time.sleep(plan.idle_s)
    idle_dump = grind.dump("idle")
    grind.instrument(False)
    return ProcessResult(measured, total_ir(idle_dump), plan.idle_s, idle_dump)
