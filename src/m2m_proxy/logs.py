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
        self._secrets = tuple(s for s in secrets if len(s) >= 4)

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
            Redactor(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    return logger


class AccessLog:
    """The ``request_completed`` line, on the hot path: one JSON encode, batched writes.

    structlog's processor chain costs about as much as the rest of the proxy's own
    per-request work, so this one event skips it. Lines completed in one event-loop
    iteration are written and flushed together at its end (one syscall under load,
    still immediate when idle). Every field is a value the proxy
    produced (a configured route name, a method aiohttp validated as an HTTP token,
    numbers and outcome labels), so there is nothing to redact. On a TTY, or when
    ``info`` is filtered out, it defers to (or skips like) the structlog logger.
    """

    __slots__ = ("_enabled", "_encode", "_fallback", "_pending", "_second", "_stamp", "_stream")

    def __init__(
        self, fallback: Logger, *, level: str, stream: TextIO | None, json_output: bool | None
    ) -> None:
        out = stream if stream is not None else sys.stdout
        self._enabled = logging.getLevelName(level.upper()) <= logging.INFO
        self._stream: TextIO | None = (
            out if (json_output if json_output is not None else not out.isatty()) else None
        )
        self._fallback = fallback
        self._encode = json.JSONEncoder(separators=(", ", ": ")).encode
        self._second = -1
        self._stamp = ""
        self._pending: list[str] = []

    def completed(self, **fields: Any) -> None:
        """Emit one request_completed line with ``fields`` (our own values only)."""
        if not self._enabled:
            return
        if self._stream is None:
            self._fallback.info("request_completed", **fields)
            return
        fields["event"] = "request_completed"
        fields["level"] = "info"
        fields["timestamp"] = self._timestamp()
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a synchronous caller): write at once
                self._stream.write(self._encode(fields) + "\n")
                self._stream.flush()
                return
        self._pending.append(self._encode(fields))

    def flush(self) -> None:
        """Write the lines not yet written."""
        if self._pending and self._stream is not None:
            self._pending.append("")
            self._stream.write("\n".join(self._pending))
            self._stream.flush()
            self._pending.clear()

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


def make_logs(
    level: str = "info",
    *,
    stream: TextIO | None = None,
    json_output: bool | None = None,
    secrets: Iterable[str] = (),
) -> Logs:
    events = make_logger(level, stream=stream, json_output=json_output, secrets=secrets)
    access = AccessLog(events, level=level, stream=stream, json_output=json_output)
    return Logs(events, access)


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
