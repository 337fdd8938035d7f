"""YAML text → plain data, with the position of every key and value kept.

Parsing uses PyYAML's SafeLoader composer (no arbitrary tags). ``${VAR}`` and
``${VAR:-default}`` (default when VAR is unset or empty, as in the shell) expand from
the given environment inside string scalars; ``$$`` is a literal ``$``. Problems
(syntax, duplicate keys, unset variables) are collected, not raised one at a time,
so ``m2m-proxy check`` can list them all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class Mark:
    """1-based line and column in the source file."""

    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration problem, rendered as ``FILE:LINE:COL: path: message``."""

    file: str
    mark: Mark | None
    path: str
    message: str

    def __str__(self) -> str:
        """One line, always: line breaks in a path or message are shown escaped."""
        where = f"{self.file}:{self.mark.line}:{self.mark.column}" if self.mark else self.file
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return text.replace("\r", "\\r").replace("\n", "\\n")


@dataclass(slots=True)
class SourceDocument:
    """Parsed data plus the marks of each path's key and value."""

    data: Any
    key_marks: dict[Path, Mark] = field(default_factory=dict)
    value_marks: dict[Path, Mark] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def mark_for(self, path: Path, *, key: bool = False) -> Mark | None:
        """The mark of ``path`` or of its nearest ancestor that has one."""
        primary, secondary = (
            (self.key_marks, self.value_marks) if key else (self.value_marks, self.key_marks)
        )
        for end in range(len(path), -1, -1):
            prefix = path[:end]
            if prefix in primary:
                return primary[prefix]
            if prefix in secondary:
                return secondary[prefix]
        return None


def format_path(path: Path) -> str:
    """('routes', 0, 'client') → 'routes[0].client'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def parse_yaml(text: str, file: str, environ: Mapping[str, str]) -> SourceDocument:
    """Compose ``text`` safely and convert it, recording marks and problems."""
    doc = SourceDocument(data=None)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.reader.ReaderError, RecursionError) as exc:
        reason = (
            "it nests too deeply"
            if isinstance(exc, RecursionError)
            else "it contains a control character"
        )
        doc.problems.append(Problem(file, None, "", f"invalid YAML: {reason}; fix the file"))
        return doc
    except yaml.MarkedYAMLError as exc:
        mark = _mark(exc.problem_mark) if exc.problem_mark else None
        hint = "fix the syntax at this spot"
        lines = text.splitlines()
        at = exc.problem_mark.line if exc.problem_mark else len(lines)
        line = lines[at] if at < len(lines) else ""
        if "${" in line and "[" in line:
            hint = 'inside [ ] quote each ${VAR} reference ("${VAR}"), or write a block list'
        doc.problems.append(Problem(file, mark, "", f"invalid YAML: {exc.problem}; {hint}"))
        return doc
    if node is None:
        doc.data = {}
        return doc
    converter = _Converter(file, environ, doc)
    try:
        doc.data = converter.convert(node, ())
    except (_TooLargeError, RecursionError):
        doc.data = None
        doc.problems.append(
            Problem(
                file,
                None,
                "",
                f"the file expands to more than {MAX_NODES} values or {MAX_DEPTH} levels "
                "(recursive or nested aliases?); write it out plainly",
            )
        )
    return doc


def _mark(m: yaml.Mark) -> Mark:
    return Mark(m.line + 1, m.column + 1)


MAX_NODES = 100_000
"""Values in a routes file after aliases are expanded: far above any real file, far
below what an alias bomb expands to."""
MAX_DEPTH = 64


class _TooLargeError(Exception):
    pass


class _Converter:
    def __init__(self, file: str, environ: Mapping[str, str], doc: SourceDocument) -> None:
        self._file = file
        self._environ = environ
        self._doc = doc
        self._constructor = yaml.constructor.SafeConstructor()
        self._nodes = 0

    def convert(self, node: yaml.Node, path: Path) -> Any:
        self._nodes += 1
        if self._nodes > MAX_NODES or len(path) > MAX_DEPTH:
            raise _TooLargeError
        self._doc.value_marks[path] = _mark(node.start_mark)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        value = self._construct(node, path)
        if isinstance(value, str):
            return self._expand(value, node, path)
        return value

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self._construct(key_node, path)
            if key is None:
                continue
            if not isinstance(key, str | int):
                self._problem(key_node, path, "keys must be plain strings; quote this key")
                continue
            key = str(key)
            child = (*path, key)
            if key in out:
                self._problem(
                    key_node, child, "duplicate key; keep only one of them (YAML would drop one)"
                )
                continue
            self._doc.key_marks[child] = _mark(key_node.start_mark)
            out[key] = self.convert(value_node, child)
        return out

    def _construct(self, node: yaml.Node, path: Path) -> Any:
        """A scalar's value; an unsupported tag or bad tagged value is a problem, not a crash."""
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError):
            tag = node.tag.rsplit(":", 1)[-1]
            self._problem(
                node,
                path,
                f"cannot read this value (tag {tag!r}); write a plain "
                "string, number, list or mapping",
            )
            return None

    def _expand(self, value: str, node: yaml.Node, path: Path) -> str:
        if "$" not in value:
            return value

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            value = self._environ.get(name)
            if default is not None and not value:
                return default  # as in the shell: ${VAR:-x} also replaces an empty VAR
            if value is not None:
                return value
            self._problem(
                node,
                path,
                f"environment variable {name} is not set; export {name}=... before starting, "
                f"or write ${{{name}:-default}}",
            )
            return ""

        return _ENV_REF.sub(substitute, value)

    def _problem(self, node: yaml.Node, path: Path, message: str) -> None:
        self._doc.problems.append(
            Problem(self._file, _mark(node.start_mark), format_path(path), message)
        )
