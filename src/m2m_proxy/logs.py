"""Structured logs: structlog, JSON when not on a TTY, secrets redacted.

The first line of defence is never handing secrets, tokens, header maps or IdP
bodies to a logger. The redaction processor here is the second: it masks values
under secret-looking keys, ``Bearer``/``Basic`` credentials and any configured
secret wherever they appear. aiohttp's own loggers (which can echo raw request
lines and headers on parse errors) are bridged with their arguments and
exception text dropped: only the message template and exception type remain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, TextIO

import structlog

Logger = structlog.typing.FilteringBoundLogger

_SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "token",
        "access_token",
        "client_secret",
        "secret",
        "password",
        "client_assertion",
    }
)
_CREDENTIAL = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
REDACTED = "[redacted]"


class Redactor:
    """structlog processor masking secrets; ``secrets`` are exact strings to mask."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Mask these too (a secret read again from its file, a reloaded config)."""
        known = set(self._secrets)
        self._secrets += tuple(s for s in secrets if len(s) >= 4 and s not in known)

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event.items():
            event[key] = self._clean(key, value)
        return event

    def _clean(self, key: object, value: Any) -> Any:
        if isinstance(key, str) and key.lower() in _SECRET_KEYS:
            return REDACTED
        if isinstance(value, str):
            return self.scrub(value) if value else value
        if isinstance(value, Mapping):
            return {k: self._clean(k, v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(None, v) for v in value]
        return value

    def scrub(self, text: str) -> str:
        text = _CREDENTIAL.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


def make_logger(
    level: str = "info",
    *,
    stream: TextIO | None = None,
    json_output: bool | None = None,
    secrets: Iterable[str] = (),
    redactor: Redactor | None = None,
) -> Logger:
    """A logger writing to ``stream`` (stdout): JSON lines unless it is a TTY."""
    out = stream if stream is not None else sys.stdout
    as_json = json_output if json_output is not None else not out.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    logger: Logger = structlog.wrap_logger(
        structlog.WriteLogger(out),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redactor if redactor is not None else Redactor(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    return logger


class AccessLog:
    """The ``request_completed`` line, on the hot path: formatted directly, written in batches.

    structlog's processor chain, and even a generic JSON encoder, cost more than the
    rest of the proxy's own per-request work, so this one event is formatted by hand.
    Every field is a value the proxy produced (a configured route name, a method
    aiohttp validated as an HTTP token, numbers and fixed labels); strings are
    JSON-encoded once and memoised. Lines finished in one event-loop iteration are
    written and flushed together at its end (one syscall under load, still immediate
    when idle). On a TTY it defers to the structlog logger; above ``info`` it is silent.
    """

    __slots__ = (
        "_enabled",
        "_fallback",
        "_loop",
        "_pending",
        "_second",
        "_stamp",
        "_stream",
        "_strings",
    )

    def __init__(
        self, fallback: Logger, *, level: str, stream: TextIO | None, json_output: bool | None
    ) -> None:
        out = stream if stream is not None else sys.stdout
        self._enabled = logging.getLevelName(level.upper()) <= logging.INFO
        self._stream: TextIO | None = (
            out if (json_output if json_output is not None else not out.isatty()) else None
        )
        self._fallback = fallback
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[str] = []
        self._second = -1
        self._stamp = ""
        self._strings: dict[str, str] = {}

    def completed(
        self,
        *,
        route: str,
        method: str,
        status: int,
        duration_s: float,
        token_cache: str,
        retried: str,
        error: str,
    ) -> None:
        """Emit one request_completed line (``error`` "" means none)."""
        if not self._enabled:
            return
        if self._stream is None:
            self._fallback.info(
                "request_completed",
                route=route,
                method=method,
                status=status,
                duration_ms=round(duration_s * 1000, 2),
                token_cache=token_cache,
                retried=retried,
                error=error or None,
            )
            return
        line = (
            f'{{"route": {self._json(route)}, "method": {self._json(method)}, '
            f'"status": {status}, "duration_ms": {duration_s * 1000:.2f}, '
            f'"token_cache": "{token_cache}", "retried": "{retried}", '
            f'"error": {self._json(error) if error else "null"}, '
            f'"event": "request_completed", "level": "info", "timestamp": "{self._timestamp()}"}}'
        )
        if not self._pending and not self._schedule_flush():
            self._stream.write(line + "\n")
            self._stream.flush()
            return
        self._pending.append(line)

    def flush(self) -> None:
        """Write the lines not yet written."""
        if self._pending and self._stream is not None:
            self._pending.append("")
            self._stream.write("\n".join(self._pending))
            self._stream.flush()
            self._pending.clear()

    def _schedule_flush(self) -> bool:
        """Flush at the end of this loop iteration; False when there is no running loop."""
        loop = self._loop
        if loop is None or not loop.is_running():
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return False
        loop.call_soon(self.flush)
        return True

    def _json(self, text: str) -> str:
        encoded = self._strings.get(text)
        if encoded is None:
            encoded = json.dumps(text)
            if len(self._strings) < 1024:
                self._strings[text] = encoded
        return encoded

    def _timestamp(self) -> str:
        """ISO 8601 UTC with microseconds; the date part is formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1_000_000):06d}Z"


@dataclass(frozen=True, slots=True)
class Logs:
    """The proxy's two log outlets: structured events and the per-request access line."""

    events: Logger
    access: AccessLog
    redactor: Redactor


def make_logs(
    level: str = "info",
    *,
    stream: TextIO | None = None,
    json_output: bool | None = None,
    secrets: Iterable[str] = (),
) -> Logs:
    redactor = Redactor(secrets)
    events = make_logger(level, stream=stream, json_output=json_output, redactor=redactor)
    access = AccessLog(events, level=level, stream=stream, json_output=json_output)
    return Logs(events, access, redactor)


class _AiohttpBridge(logging.Handler):
    """Sends aiohttp's stdlib records to our logger, stripped of request data."""

    def __init__(self, log: Logger) -> None:
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        exc_type = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        self._log.log(
            record.levelno,
            "library_logged",
            logger=record.name,
            message=str(record.msg)[:200],
            exception=exc_type,
        )


def bridge_library_logs(log: Logger, level: str) -> None:
    """Route aiohttp's loggers through ``log`` (idempotent)."""
    root = logging.getLogger("aiohttp")
    for handler in list(root.handlers):
        if isinstance(handler, _AiohttpBridge):
            root.removeHandler(handler)
    root.addHandler(_AiohttpBridge(log))
    root.setLevel(max(logging.getLevelName(level.upper()), logging.INFO))
    root.propagate = False
    logging.getLogger("aiohttp.access").disabled = True
