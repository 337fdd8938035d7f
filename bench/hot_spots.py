"""Where the instructions go: callgrind_annotate's function lists and the dump's call edges
parsed, and the hot-spot tables of the --instructions report (C m2m-host, and C against B)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from instructions import InstructionsError, Sample
from scenario import ROOT, BenchError

# "  1,234,567 (12.34%)  file:function'2 [object]" in callgrind_annotate's function list.
_ANNOTATE_LINE = re.compile(
    r"^\s*(?P<ir>[\d,]+)\s+\(\s*[\d.]+%\)\s+(?P<file>[^:]*):(?P<function>.+?)"
    r"(?:'(?P<depth>\d+))?(?: \[(?P<object>[^\]]*)\])?\s*$"
)


@dataclass(frozen=True, slots=True)
class FunctionCost:
    ir: int
    function: str
    obj: str  # basename of the shared object or executable; "" when callgrind_annotate omits it

    @property
    def label(self) -> str:
        return f"{self.function} [{self.obj}]" if self.obj else self.function


def short_object(path: str) -> str:
    """``uvloop/loop.so`` for .../site-packages/uvloop/loop.cpython-311-x86_64-linux-gnu.so,
    ``_json.so`` for the standard library's, ``libpython3.11.so.1.0`` for the interpreter."""
    where = Path(path)
    name = re.sub(r"\.cpython-[^.]+", "", where.name)
    return f"{where.parent.name}/{name}" if "site-packages" in where.parts else name


def annotate(dump: Path, *, inclusive: bool) -> list[FunctionCost]:
    """Every function of a dump with its Ir, largest first: self cost (``inclusive`` False) or
    including callees.

    callgrind_annotate lists a function once per source file its code came from (inlined
    header code separately, without the object) and once per recursion depth (``f'2``).
    Self costs are summed over all of these. Inclusive costs are taken from the outermost
    entry only (deeper ones re-count the same instructions), the largest per function."""
    argv = [
        "callgrind_annotate",
        f"--inclusive={'yes' if inclusive else 'no'}",
        "--threshold=100",
        "--show-percs=yes",
        "--auto=no",
        str(dump),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise InstructionsError(f"{' '.join(argv)} failed:\n{result.stderr}")
    irs: dict[str, int] = {}
    objects: dict[str, str] = {}
    for line in result.stdout.splitlines():
        match = _ANNOTATE_LINE.match(line)
        if match is None or "PROGRAM TOTALS" in line:
            continue
        function, ir = match["function"], int(match["ir"].replace(",", ""))
        if match["object"]:
            objects.setdefault(function, short_object(match["object"]))
        if not inclusive:
            irs[function] = irs.get(function, 0) + ir
        elif match["depth"] is None:
            irs[function] = max(irs.get(function, 0), ir)
    costs = [FunctionCost(ir, name, objects.get(name, "")) for name, ir in irs.items()]
    return sorted(costs, key=lambda cost: -cost.ir)


_RECURSION = re.compile(r"'\d+$")


def call_edges(dump: Path) -> dict[tuple[str, str], int]:
    """(caller, callee) -> Ir spent in the callee on behalf of the caller, recursion depth
    suffixes (``'2``) dropped; read from the dump (written with --compress-strings=no)."""
    edges: dict[tuple[str, str], int] = {}
    caller = callee = ""
    cost_line_next = False
    with dump.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if cost_line_next:
                cost_line_next = False
                key = (caller, callee)
                edges[key] = edges.get(key, 0) + int(line.split()[1])
            elif line.startswith("fn="):
                caller = _RECURSION.sub("", line[3:].strip())
            elif line.startswith("cfn="):
                callee = _RECURSION.sub("", line[4:].strip())
            elif line.startswith("calls="):
                cost_line_next = True
    return edges


# Interpreter, asyncio and uvloop plumbing that every Python frame and callback passes through:
# left out of the "hot spots" list, which is about what the instructions are spent *on*.
_PLUMBING = re.compile(
    r"^(_?PyEval_\w+|_PyEvalFramePushAndInit|_PyFrame_Clear|initialize_locals"
    r"|_?PyFunction_Vectorcall|_?PyObject_(Vectorcall|Call|FastCall)\w*|_PyObject_MakeTpCall"
    r"|PyVectorcall_Call|_PyStack_AsDict|method_vectorcall\w*|cfunction_\w+|vectorcall_\w+"
    r"|slot_tp_\w+|type_call|wrap_\w+|context_run|PyIter_Send|PyGen_am_send|gen_\w+"
    r"|_PyGen_\w+|coro_wrapper_iternext|task_\w+|TaskStepMethWrapper_call|FutureIter_\w+"
    r"|future_\w+|_Py_Dealloc|PyObject_GetAttr|_?PyObject_GenericGetAttr\w*|property_descr_get"
    r"|uv_run|uv__run_idle|uv__io_poll|uv__io_cb|__Pyx_PyObject_\w+|__Pyx_CyFunction_\w+"
    r"|__pyx_f_6uvloop_4loop_(cb_idle_callback|6Handle__run|4Loop__on_idle|run_in_context\d*)"
    r"|main|Py_\w*Main|pymain_\w+|__libc_start\w+|_start|\(below main\)|0x[0-9a-f]+)$"
)


def _function_table(
    costs: Sequence[FunctionCost],
    edges: dict[tuple[str, str], int],
    per: int,
    total: float,
    limit: int,
) -> list[str]:
    """Inclusive costs; a chain of calls where the callee costs >= 97 % of its caller (a
    wrapper and what it wraps) is one row, outermost -> innermost."""
    rows: list[tuple[FunctionCost, FunctionCost]] = []  # outer, inner
    for cost in costs:
        if rows:
            outer, inner = rows[-1]
            if edges.get((inner.function, cost.function), 0) >= 0.97 * inner.ir:
                rows[-1] = (outer, cost)
                continue
        if len(rows) == limit:
            break
        rows.append((cost, cost))
    lines = ["| Ir/request | share | function [object] |", "|---:|---:|---|"]
    for outer, inner in rows:
        name = outer.function if inner is outer else f"{outer.function} -> {inner.function}"
        where = f" [{outer.obj}]" if outer.obj else ""
        lines.append(f"| {outer.ir / per:,.0f} | {outer.ir / per / total:.1%} | `{name}`{where} |")
    return lines


def _per_request(costs: Sequence[FunctionCost], requests: int, key: str) -> dict[str, float]:
    into: dict[str, float] = {}
    for cost in costs:
        name = cost.label if key == "function" else cost.obj or "?"
        into[name] = into.get(name, 0.0) + cost.ir / requests
    return into


def _delta_table(
    c_self: Sequence[FunctionCost],
    b_self: Sequence[FunctionCost],
    requests: int,
    key: str,
    limit: int,
) -> list[str]:
    """Self Ir/request per function (or per object) in C and in B, largest C - B first."""
    c_per = _per_request(c_self, requests, key)
    b_per = _per_request(b_self, requests, key)
    rows = sorted(
        ((name, c_per.get(name, 0.0), b_per.get(name, 0.0)) for name in c_per.keys() | b_per),
        key=lambda row: row[2] - row[1],
    )
    lines = [f"| C - B | C | B | {key} |", "|---:|---:|---:|---|"]
    lines += [f"| {c - b:+,.0f} | {c:,.0f} | {b:,.0f} | `{name}` |" for name, c, b in rows[:limit]]
    return lines


def hot_spots(c: Sample, b: Sample) -> str:
    """Where C's instructions go (inclusive), and where it spends more than B (self)."""
    try:
        inclusive = annotate(c.dump, inclusive=True)
        c_self = annotate(c.dump, inclusive=False)
        b_self = annotate(b.dump, inclusive=False)
    except InstructionsError as err:
        raise BenchError(str(err)) from err
    if c.requests != b.requests:
        raise BenchError("C and B samples of different sizes")
    per, total = c.requests, c.ir_per_request
    edges = call_edges(c.dump)
    hot = [cost for cost in inclusive if not _PLUMBING.match(cost.function)]
    return "\n".join(
        [
            f"C m2m-host, top 15 functions by inclusive Ir/request ({c.dump.relative_to(ROOT)}):",
            *_function_table(inclusive, edges, per, total, 15),
            "",
            "C m2m-host, the same without interpreter, asyncio and uvloop plumbing:",
            *_function_table(hot, edges, per, total, 15),
            "",
            "Where C spends more than B, self Ir/request by shared object "
            f"(C - B in all: {total - b.ir_per_request:+,.0f}):",
            *_delta_table(c_self, b_self, per, "object", 8),
            "",
            "... and by function:",
            *_delta_table(c_self, b_self, per, "function", 15),
        ]
    )
