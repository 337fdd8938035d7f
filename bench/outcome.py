"""The end of a run, the same in every mode: the report's common fields, the tally printed,
and the verdict on whether the run was clean (the exit code)."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from machine import git_info
from rig import Tally

# 1 by bench (for A and B's fixed header) + 1 by m2m-proxy if its cache works.
EXPECTED_TOKEN_REQUESTS = 2


def report_head(machine: dict[str, Any]) -> dict[str, Any]:
    """The first fields of every JSON report: when, which commit, which machine."""
    return {
        "generated_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "git": git_info(),
        "machine": machine,
    }


def tally_json(tally: Tally) -> dict[str, Any]:
    """The report fields of a tally (the demo API's list of revoked tokens left out)."""
    return {
        "idp_token_requests": tally.token_requests,
        "demo_api_stats": {k: v for k, v in tally.api_stats.items() if k != "revoked"},
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    """``report`` as indented JSON, its folder created if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def print_tally(tally: Tally) -> None:
    """Token requests, demo API statistics and m2m-proxy's stderr, if any."""
    print(
        f"IdP token requests during the run: {tally.token_requests} "
        f"(expected {EXPECTED_TOKEN_REQUESTS}: ours + m2m-proxy's)"
    )
    print(f"demo API: {tally_json(tally)['demo_api_stats']}")
    if tally.m2m_stderr:
        print(f"m2m-proxy stderr:\n{tally.m2m_stderr}")


def verdict(tally: Tally, failed_targets: Sequence[str] = ()) -> int:
    """0 if the run was clean; else 1, the problems printed to stderr: ``failed_targets``
    saw non-2xx answers or socket errors, the demo API rejected requests, or the IdP saw
    other than the expected token requests."""
    rejected = tally.api_stats.get("rejected_401", 0) + tally.api_stats.get("rejected_403", 0)
    problems = []
    if failed_targets:
        problems.append(f"non-2xx or socket errors for {', '.join(failed_targets)}")
    if rejected:
        problems.append(f"the demo API rejected {rejected} requests")
    if tally.token_requests != EXPECTED_TOKEN_REQUESTS:
        problems.append(
            f"the IdP saw {tally.token_requests} token requests, expected {EXPECTED_TOKEN_REQUESTS}"
        )
    if problems:
        print(f"bench: FAILED: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0
