"""The generated sections of docs/benchmarks.md, common to the wrk part (summary.py) and the
HTTPS part (https_summary.py): the lines each starts with (when, which commit, which
machine), the small formatting helpers their tables share, and replacing the text between a
section's markers.

Pure, but for :func:`write_section`."""

from __future__ import annotations

from typing import Any

from scenario import ROOT, BenchError

DOCS = ROOT / "docs" / "benchmarks.md"


def errors_text(errors: dict[str, int]) -> str:
    """ "none", or the non-zero counts: "status 3, timeout 1"."""
    parts = [f"{k} {v}" for k, v in errors.items() if v]
    return ", ".join(parts) if parts else "none"


def spread(values: list[float]) -> str:
    """min-max of ratios, two decimals."""
    return f"{min(values):.2f}-{max(values):.2f}"


def rounds(n: int) -> str:
    """ "1 round", "3 rounds"."""
    return f"{n} round" if n == 1 else f"{n} rounds"


def run_header(report: dict[str, Any]) -> list[str]:
    """The run and the machine: the first lines of a generated section."""
    m = report["machine"]
    git = report["git"]
    modified = " (src/ had uncommitted changes)" if git["src_modified"] else ""
    return [
        f"Run of {report['generated_at']} on commit `{git['commit']}`{modified}.",
        "",
        f"- Machine: {m['nproc']} cores ({m['cpu_model']}), Linux {m['kernel']}, "
        f"load average at start {', '.join(str(x) for x in m['loadavg_at_start'])}",
    ]


def section(begin: str, end: str, lines: list[str]) -> str:
    """A generated section, markers included."""
    return "\n".join([begin, "", *lines, "", end])


def write_section(begin: str, end: str, text: str) -> None:
    """Replace the section between the markers ``begin`` and ``end`` of docs/benchmarks.md
    with ``text`` (markers included)."""
    doc = DOCS.read_text(encoding="utf-8")
    start, stop = doc.find(begin), doc.find(end)
    if start < 0 or stop < start:
        raise BenchError(f"{DOCS} has no markers {begin} ... {end}")
    DOCS.write_text(doc[:start] + text + doc[stop + len(end) :], encoding="utf-8")
