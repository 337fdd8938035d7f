"""Property-based tests (hypothesis): the routes-file loader and the header rules.

(a) Random documents built from the schema's own field names (so new fields are
    covered as they are added) with random, often wrong, values never make
    ``parse_config`` raise anything but ``ConfigError``, and every problem renders as
    ``FILE:LINE:COL: path: message`` (or ``FILE: ...`` without a position).
(b) ``upstream_request_headers`` / ``downstream_response_headers`` on random header
    multidicts: no hop-by-hop field, no field named in Connection, exactly one
    Authorization when a token is given, and every other field kept in order.

Known crashers of the loader are example tests below (xfail) and are kept out of the
generators until they are fixed (see ``KNOWN_LOADER_CRASHERS``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import types
import typing
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import BaseModel

from m2m_proxy.config import ConfigError, parse_config
from m2m_proxy.config.schema import RoutesFile
from m2m_proxy.headers import downstream_response_headers, upstream_request_headers

CI_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FILE = "routes.yaml"
ENV = {"SECRET": "s3cret-value", "EMPTY": "", "PORT": "8080"}

# -- (a) the routes-file loader ----------------------------------------------------------

NAMES = ["svc", "other", "c", "api", "a.b", "", " ", "1", "true", "null"]
STRINGS = st.one_of(
    st.sampled_from(
        [
            *NAMES,
            "${SECRET}",
            "${UNSET}",
            "${UNSET:-fallback}",
            "${EMPTY:-x}",
            "$$",
            "${",
            "${1BAD}",
            "127.0.0.1:0",
            "127.0.0.1:${PORT}",
            "0.0.0.0:8080",
            "[::1]:0",
            "[::1",
            ":",
            ":80",
            "localhost:65536",
            "http://127.0.0.1:1/token",
            "https://idp.example.com/oauth2/token",
            "http://idp.example.com/token",
            "https://",
            "http://[::1",
            "ftp://x/y",
            "api.example.com",
            "api.example.com:443",
            "*.example.com",
            "*.",
            "*",
            "a..b",
            "-a.b",
            "/v1",
            "v1",
            "/",
            "read write",
            "/nonexistent/file.pem",
            "deny",
            "passthrough",
            "intercept",
            "tunnel",
            "client_secret_post",
            "private_key_jwt",
            "RS256",
            "debug",
            "10.0.0.0/8",
            "::/0",
            "1.2.3.4/99",
            "é",
            "\t",
            "x" * 300,
        ]
    ),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=20),
)
SCALARS: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 65535, 65536, 443, 80]),
    st.floats(allow_nan=True, allow_infinity=True),
    STRINGS,
)


def _for_type(tp: Any, depth: int) -> st.SearchStrategy[Any]:
    """Values of the annotated type (or near it); junk is mixed in by the caller."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _model(tp, depth + 1)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_for_type(a, depth) for a in args])
    if origin is dict:
        keys = st.sampled_from(["svc", "other"]) | st.sampled_from(NAMES) | STRINGS
        return st.dictionaries(keys, _field(args[1], depth + 1), max_size=3)
    if origin is list:
        return st.lists(_field(args[0], depth + 1), max_size=3)
    simple: dict[Any, st.SearchStrategy[Any]] = {
        str: STRINGS,
        int: st.integers(min_value=-5, max_value=70000),
        float: st.floats(min_value=-1, max_value=1e6) | st.sampled_from([0.0, 0.001]),
        bool: st.booleans(),
        type(None): st.none(),
    }
    return simple.get(tp, SCALARS)


HINTS: dict[str, list[Any]] = {
    "client": ["svc", "other", "missing"],
    "host": [
        "api.example.com",
        "*.example.com",
        "api.example.com:8443",
        "10.0.0.1",
        "a_b.internal",
    ],
    "token_url": ["https://idp.example.com/oauth2/token", "http://127.0.0.1:9/token"],
    "issuer": ["https://idp.example.com", "http://localhost:9"],
    "upstream": ["https://api.example.com", "http://127.0.0.1:8080", "https://[::1]:8443"],
    "listen": ["127.0.0.1:0", "127.0.0.1:8080", 8080, "[::1]:0"],
    "admin_listen": ["127.0.0.1:0", "127.0.0.1:9901", 9901],
    "client_id": ["svc", "other-id"],
    "client_secret": ["${SECRET}", "s3cret", ["${SECRET}", "older"]],
    "path_prefix": ["/v1", "", "/v1/", "v1", "/a/../b"],
    "scope": ["read", ["read", "write"], "read write"],
    "allow_from": [["127.0.0.1/32"], ["10.0.0.0/8", "::1"], ["not-a-cidr"]],
    "connect_ports": [[443], [443, 8443], [0]],
}
"""Values near the valid ones, so documents often get past the shape checks into the
cross-field rules."""


def _field(tp: Any, depth: int, name: str = "") -> st.SearchStrategy[Any]:
    if depth > 4:
        return SCALARS
    typed = _for_type(tp, depth)
    if name in HINTS:
        return _weighted((3, st.sampled_from(HINTS[name])), (1, typed), (1, SCALARS))
    return _weighted((4, typed), (1, SCALARS))


def _model(model: type[BaseModel], depth: int) -> st.SearchStrategy[dict[str, Any]]:
    known = st.fixed_dictionaries(
        {},
        optional={
            name: _field(info.annotation, depth, name) for name, info in model.model_fields.items()
        },
    )
    unknown = st.dictionaries(
        st.sampled_from([*model.model_fields, "listen_", "clent", "Host"]).map(
            lambda name: name + "x" if name in model.model_fields else name
        ),
        SCALARS,
        max_size=1,
    )
    return st.builds(lambda a, b: {**a, **b}, known, _weighted((1, unknown), (3, st.just({}))))


def _weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``choices``, picked with the given integer weights."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(min_value=0, max_value=len(table) - 1).flatmap(lambda i: table[i])


DOCUMENTS = _weighted((8, _model(RoutesFile, 0)), (1, SCALARS), (1, st.lists(SCALARS, max_size=2)))

_PROBLEM = re.compile(r"^(?P<file>[^:]+)(?::(?P<line>\d+):(?P<col>\d+))?: (?P<rest>.+)$", re.S)


def _check_problems(error: ConfigError, text: str) -> None:
    assert error.problems, "a ConfigError without problems"
    assert str(error) == "\n".join(str(p) for p in error.problems)
    lines = text.count("\n") + 1
    for problem in error.problems:
        rendered = str(problem)
        match = _PROBLEM.match(rendered)
        assert match is not None, rendered
        assert match["file"] == FILE, rendered
        if problem.mark is not None:
            assert match["line"] is not None, rendered
            assert 1 <= int(match["line"]) <= lines + 1, (rendered, lines)
            assert int(match["col"]) >= 1, rendered
        else:
            assert match["line"] is None, rendered
        if problem.path:
            assert match["rest"].startswith(f"{problem.path}: "), rendered
        assert problem.message.strip(), rendered


def _parse(text: str) -> None:
    try:
        parse_config(text, FILE, ENV)
    except ConfigError as exc:
        _check_problems(exc, text)


@CI_SETTINGS
@given(DOCUMENTS)
def test_random_documents_from_the_schema_only_ever_raise_config_error(doc: Any) -> None:
    _parse(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


# Raw YAML-ish text: syntax errors, tags, flow/block mixes, anchors (no aliases: see
# KNOWN_LOADER_CRASHERS), environment references, odd indentation.
FRAGMENTS = st.sampled_from(
    [
        "proxy:",
        "clients:",
        "routes:",
        "\n",
        "\n  ",
        "\n    ",
        "\n  - ",
        "- ",
        "listen: ",
        "host: ",
        "client: ",
        "token_url: ",
        "client_id: ",
        "upstream: ",
        "scope: ",
        "svc:",
        "{",
        "}",
        "[",
        "]",
        ", ",
        ": ",
        "? ",
        "&a ",
        "!!str ",
        "!!int ",
        "!!float ",
        "!!bool ",
        "!!binary ",
        "!!map ",
        "!!seq ",
        "!!timestamp ",
        "!!python/object:os.system ",
        "!custom ",
        "---",
        "...",
        "%YAML 1.1\n",
        "'",
        '"',
        "# c",
        "|",
        ">",
        "\t",
        "${SECRET}",
        "${UNSET}",
        "$$",
        "127.0.0.1:0",
        "http://127.0.0.1:1/t",
        "api.example.com",
        "*.x",
        "1",
        "-1",
        "1e400",
        ".nan",
        "~",
        "yes",
        "2001-12-14",
        "0x1F",
        "0o17",
        "é",
        "\ufeff",
    ]
)


@CI_SETTINGS
@given(st.lists(FRAGMENTS | STRINGS, max_size=60).map("".join))
def test_random_yaml_text_only_ever_raises_config_error(text: str) -> None:
    _parse(text)


KNOWN_LOADER_CRASHERS = {
    "recursive alias": "proxy: &a\n  name: *a\n",
    "recursive list alias": "routes: &a [*a]\n",
    "deep nesting": "proxy: " + "[" * 2000 + "]" * 2000 + "\n",
    "NUL character": "proxy:\n  name: \x00\n",
    "C1 control character": "proxy:\n  name: a\x85\x9fb\n",
}


@pytest.mark.parametrize("text", [pytest.param(v, id=k) for k, v in KNOWN_LOADER_CRASHERS.items()])
def test_hostile_yaml_is_a_config_error(text: str) -> None:
    _parse(text)


_BOMB_CHILD = """
import sys, time
from m2m_proxy.config import ConfigError, parse_config
started = time.monotonic()
try:
    parse_config(sys.stdin.read(), "routes.yaml", {})
    refused = False
except ConfigError:
    refused = True
print(refused, time.monotonic() - started)
"""


def test_alias_bomb_is_refused_quickly() -> None:
    # a0 .. a8: 9**9 (387 million) leaves from a 700-byte file: expanding it would not end
    # within the child's 20 s (nor fit in memory), so finishing at all proves the refusal
    # comes before the expansion; the time bound is loose, a machine's noise cannot reach it
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for n in range(1, 9):
        levels.append(f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]")
    try:
        child = subprocess.run(
            [sys.executable, "-c", _BOMB_CHILD],
            input="\n".join(levels) + "\n",
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("parse_config ran for over 20 s") from None
    refused, took = child.stdout.split()
    assert refused == "True"
    assert float(took) < 5.0, f"parse_config took {float(took):.1f} s"


@pytest.mark.parametrize(
    "text",
    [
        'proxy:\n  listen: "a\\nroutes.yaml:1:1: forged problem:80"\n',
        'routes:\n  - {host: "a\\nb", client: c}\n',
        'proxy:\n  "x\\ny": 1\n',
    ],
)
def test_every_problem_renders_on_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, FILE, ENV)
    for problem in info.value.problems:
        assert "\n" not in str(problem) and "\r" not in str(problem), repr(str(problem))


# -- (b) the header rules ---------------------------------------------------------------

HOP = ["Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding"]
HOP += ["Upgrade", "Proxy-Authorization", "Proxy-Authenticate", "Proxy-Foo"]
INTERESTING = [*HOP, "Authorization", "Host", "Content-Length", "Expect", "Via", "Cookie"]
INTERESTING += ["X-Secret", "X-A", "X_Under", "Content-Type", "Set-Cookie", "WWW-Authenticate"]
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@st.composite
def _case(draw: st.DrawFn, name: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in name)


FIELD_NAMES = st.one_of(
    st.sampled_from(INTERESTING).flatmap(_case),
    st.text(TOKEN_CHARS, min_size=1, max_size=12),
)
FIELD_VALUES = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from(["\t"]),
    max_size=20,
).map(str.strip)


@st.composite
def _connection_value(draw: st.DrawFn, present: list[str]) -> str:
    """A Connection value naming some of the ``present`` fields (in any case), others,
    and connection options, with odd separators and empty elements."""
    pool = FIELD_NAMES | st.sampled_from(["close", "keep-alive", ""])
    if present:
        pool = st.sampled_from(present).flatmap(_case) | pool
    names = draw(st.lists(pool, max_size=4))
    separators = st.sampled_from([",", ", ", " ,", ",\t", ",,", " , "])
    out = names[0] if names else ""
    for name in names[1:]:
        out += draw(separators) + name
    return out


@st.composite
def _headers(draw: st.DrawFn) -> list[tuple[str, str]]:
    fields = draw(st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES), max_size=12))
    present = [name for name, _ in fields]
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        at = draw(st.integers(min_value=0, max_value=len(fields)))
        fields.insert(at, (draw(_case("Connection")), draw(_connection_value(present))))
    return fields


def _named_in_connection(fields: list[tuple[str, str]]) -> set[str]:
    named: set[str] = set()
    for name, value in fields:
        if name.lower() == "connection":
            named |= {t.strip().lower() for t in value.split(",") if t.strip()}
    return named


def _is_hop(name: str) -> bool:
    lname = name.lower()
    return lname in {h.lower() for h in HOP} or lname.startswith("proxy-")


@CI_SETTINGS
@given(_headers(), st.one_of(st.none(), st.just("Bearer proxy-token")))
def test_upstream_request_headers_rules(
    fields: list[tuple[str, str]], authorization: str | None
) -> None:
    incoming = CIMultiDictProxy(CIMultiDict(fields))
    out = list(
        upstream_request_headers(
            incoming, host="api.example.com", authorization=authorization, via="1.1 m2m-proxy"
        ).items()
    )
    named = _named_in_connection(fields)
    set_by_proxy = {"host", "via"} | ({"authorization"} if authorization else set())
    for name, _value in out:
        lname = name.lower()
        assert not _is_hop(name), (name, out)
        assert lname in set_by_proxy or lname not in named, (name, named, out)
        assert lname not in {"content-length", "expect"}
        assert "_" not in name, name
    assert [v for k, v in out if k.lower() == "host"] == ["api.example.com"]
    assert out[-1] == ("Via", "1.1 m2m-proxy")
    auths = [v for k, v in out if k.lower() == "authorization"]
    if authorization is not None:
        assert auths == [authorization]
    # Every other field: kept, in order, with its value.
    dropped = {"host", "content-length", "expect"} | named
    if authorization is not None:
        dropped.add("authorization")
    expected = [
        (k, v) for k, v in fields if not _is_hop(k) and k.lower() not in dropped and "_" not in k
    ]
    kept = out[1:-1]  # Host first, our Via last
    if authorization is not None:
        kept = [(k, v) for k, v in kept if not (k == "Authorization" and v == authorization)]
    assert kept == expected


@CI_SETTINGS
@given(_headers())
def test_downstream_response_headers_rules(fields: list[tuple[str, str]]) -> None:
    incoming = CIMultiDictProxy(CIMultiDict(fields))
    out = list(downstream_response_headers(incoming, via="1.1 m2m-proxy").items())
    named = _named_in_connection(fields) - {"content-length"}
    for name, _value in out[:-1]:
        assert not _is_hop(name), (name, out)
        assert name.lower() not in named, (name, named, out)
    assert out[-1] == ("Via", "1.1 m2m-proxy")
    expected = [(k, v) for k, v in fields if not _is_hop(k) and k.lower() not in named]
    assert out[:-1] == expected
