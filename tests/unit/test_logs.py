"""Logs: the redaction processor and the JSON-lines logger."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import MutableMapping
from typing import Any

import pytest

from m2m_proxy.logs import REDACTED, Redactor, bridge_library_logs, make_logger, make_logs

SECRET = "sentinel-secret-5d2e"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvcmRlcnMifQ.c2ln"


def redact(event: dict[str, Any], secrets: tuple[str, ...] = ()) -> MutableMapping[str, Any]:
    return Redactor(secrets)(None, "info", dict(event))


@pytest.mark.parametrize(
    "key",
    [
        "authorization",
        "proxy_authorization",
        "token",
        "access_token",
        "client_secret",
        "secret",
        "password",
        "client_assertion",
    ],
)
def test_values_under_secret_looking_keys_are_masked(key: str) -> None:
    assert redact({"event": "x", key: "anything-at-all"})[key] == REDACTED


def test_masking_a_secret_key_does_not_depend_on_the_value_type() -> None:
    assert redact({"token": {"value": TOKEN}})["token"] == REDACTED


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"sent Bearer {TOKEN} upstream", f"sent Bearer {REDACTED} upstream"),
        (f"authorization: bearer {TOKEN}", f"authorization: bearer {REDACTED}"),
        ("got Basic b3JkZXJzOnMzY3JldA== back", f"got Basic {REDACTED} back"),
        (f"a=Bearer {TOKEN}, b=Bearer {TOKEN}", f"a=Bearer {REDACTED}, b=Bearer {REDACTED}"),
        (f"Bearer\t{TOKEN}", f"Bearer {REDACTED}"),
    ],
    ids=["bearer", "lower-case", "basic", "twice", "tab"],
)
def test_bearer_and_basic_credentials_in_values_are_masked(text: str, expected: str) -> None:
    assert redact({"detail": text})["detail"] == expected


def test_secret_looking_keys_are_matched_case_insensitively() -> None:
    event = redact({"Authorization": "opaque-credential", "Client_Secret": "x"})
    assert event == {"Authorization": REDACTED, "Client_Secret": REDACTED}


def test_credentials_nested_in_containers_are_masked() -> None:
    event = redact({"headers": {"Authorization": f"Bearer {TOKEN}"}, "args": [f"Bearer {TOKEN}"]})
    assert TOKEN not in repr(event)


def test_configured_secrets_are_masked_wherever_they_appear() -> None:
    event = redact({"event": f"boom {SECRET}", "detail": f"x{SECRET}y", "route": "api"}, (SECRET,))
    assert event == {"event": f"boom {REDACTED}", "detail": f"x{REDACTED}y", "route": "api"}


def test_very_short_configured_secrets_are_not_masked_everywhere() -> None:
    # A 1-3 character "secret" would mask half the log; it is skipped.
    assert redact({"route": "abc-api"}, ("abc",))["route"] == "abc-api"


def test_ordinary_fields_pass_unchanged() -> None:
    event = {"event": "request_completed", "status": 200, "route": "api", "token_cache": "hit"}
    assert redact(event) == event


def make(stream: io.StringIO, level: str = "info", secrets: tuple[str, ...] = ()) -> Any:
    return make_logger(level, stream=stream, json_output=True, secrets=secrets)


def test_json_logger_writes_one_json_object_per_line() -> None:
    stream = io.StringIO()
    log = make(stream)
    log.info("request_completed", route="api", status=200)
    log.warning("token_fetch_failed", client="orders")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "request_completed"
    assert first["route"] == "api"
    assert first["status"] == 200
    assert first["level"] == "info"
    assert first["timestamp"].endswith("Z")
    assert second["level"] == "warning"


def test_json_logger_redacts_before_writing() -> None:
    stream = io.StringIO()
    log = make(stream, secrets=(SECRET,))
    log.info("token_fetched", access_token=TOKEN, detail=f"secret was {SECRET}")
    out = stream.getvalue()
    assert TOKEN not in out
    assert SECRET not in out
    assert json.loads(out)["access_token"] == REDACTED


def test_json_logger_drops_events_below_its_level() -> None:
    stream = io.StringIO()
    log = make(stream, level="warning")
    log.info("dropped")
    log.error("kept")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["kept"]


def test_console_output_is_used_when_json_is_off() -> None:
    stream = io.StringIO()
    make_logger("info", stream=stream, json_output=False).info("started", port=8080)
    out = stream.getvalue()
    assert "started" in out
    assert "port=8080" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


@pytest.fixture
def aiohttp_logger() -> Any:
    root = logging.getLogger("aiohttp")
    saved = (list(root.handlers), root.level, root.propagate)
    access_disabled = logging.getLogger("aiohttp.access").disabled
    yield root
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]
    logging.getLogger("aiohttp.access").disabled = access_disabled


def test_library_logs_are_bridged_without_their_arguments(aiohttp_logger: logging.Logger) -> None:
    stream = io.StringIO()
    log = make(stream)
    bridge_library_logs(log, "info")
    bridge_library_logs(log, "info")  # idempotent: still one line per record
    logging.getLogger("aiohttp.server").error("Error handling request %s", f"Bearer {TOKEN}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "library_logged"
    assert event["logger"] == "aiohttp.server"
    assert event["message"] == "Error handling request %s"
    assert TOKEN not in lines[0]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


FIELDS: dict[str, Any] = {
    "route": 'api "v1"',
    "method": "GET",
    "status": 200,
    "duration_s": 0.0015,
    "token_cache": "hit",
    "retried": "no",
    "error": "",
}


def test_access_log_writes_one_json_line_with_the_fields_in_order() -> None:
    stream = io.StringIO()
    make_logs("info", stream=stream, json_output=True).access.completed(**FIELDS)
    [line] = stream.getvalue().splitlines()
    event = json.loads(line)
    assert list(event) == [
        "route",
        "method",
        "status",
        "duration_ms",
        "token_cache",
        "retried",
        "error",
        "event",
        "level",
        "timestamp",
    ]
    assert event["route"] == 'api "v1"'  # quotes in a configured name stay valid JSON
    assert event["status"] == 200
    assert event["duration_ms"] == 1.5
    assert event["error"] is None
    assert (event["event"], event["level"]) == ("request_completed", "info")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", event["timestamp"])


def test_access_log_reports_an_error_code() -> None:
    stream = io.StringIO()
    make_logs("info", stream=stream, json_output=True).access.completed(
        **{**FIELDS, "status": 499, "error": "client_closed"}
    )
    assert json.loads(stream.getvalue())["error"] == "client_closed"


async def test_access_log_lines_of_one_loop_iteration_are_written_together() -> None:
    stream = io.StringIO()
    access = make_logs("info", stream=stream, json_output=True).access
    access.completed(**FIELDS)
    access.completed(**FIELDS)
    assert stream.getvalue() == ""  # not yet: written at the end of this iteration
    await asyncio.sleep(0)
    assert len(stream.getvalue().splitlines()) == 2


def test_access_log_is_silent_above_info() -> None:
    stream = io.StringIO()
    make_logs("warning", stream=stream, json_output=True).access.completed(**FIELDS)
    assert stream.getvalue() == ""


def test_access_log_on_a_tty_uses_the_console_renderer() -> None:
    stream = _Tty()
    make_logs("info", stream=stream).access.completed(**{**FIELDS, "status": 204})
    text = stream.getvalue()
    assert "request_completed" in text
    assert not text.lstrip().startswith("{")
    assert "status=204" in text
