"""Structured logs: structlog, JSON when not on a TTY, secrets redacted.

The first line of defence is never handing secrets, tokens, header maps or IdP
bodies to a logger. The redaction processor here is the second: it masks values
under secret-looking keys, ``Bearer``/``Basic`` credentials and any configured
secret wherever they appear. aiohttp's own loggers (which can echo raw request
lines and headers on parse errors) are bridged with their arguments and
exception text dropped: only the message template and exception type remain.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
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
