"""docs/configuration.md is the reference of the routes file: every field of the config
model has a row with its default, and every row names a real field, so they cannot drift."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from m2m_proxy.config.schema import ClientSection, ProxySection, RouteSection, json_schema

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "configuration.md").read_text()
SECTIONS: dict[str, type[BaseModel]] = {
    "## `proxy`": ProxySection,
    "## `clients`": ClientSection,
    "## `routes`": RouteSection,
}


def rows(heading: str) -> dict[str, str]:
    """field → default cell of the section's table."""
    start = DOC.index(heading)
    end = DOC.find("\n## ", start + len(heading))
    out = {}
    for line in DOC[start:end].splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        match = re.fullmatch(r"`([a-z_]+)`", cells[0]) if len(cells) == 4 else None
        if match:
            out[match.group(1)] = cells[2]
    return out


def shown(value: object) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, list | dict):
        return f"`{json.dumps(value).replace(' ', '').replace(',', ', ')}`"
    return f"`{value}`"


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_every_field_is_documented_with_its_default(heading: str) -> None:
    model, documented = SECTIONS[heading], rows(heading)
    assert set(documented) == set(model.model_fields), "fields and doc rows differ"
    for name, info in model.model_fields.items():
        cell = documented[name]
        if info.is_required():
            assert cell == "required", name
            continue
        default = info.get_default(call_default_factory=True)
        if default is None:
            assert cell, name  # "none", "—", or the rule that computes it
        elif default is not PydanticUndefined:
            assert cell.startswith(shown(default)), (name, cell, shown(default))


def test_the_committed_schema_matches_the_model() -> None:
    committed = json.loads((ROOT / "routes.schema.json").read_text())
    assert committed == json_schema(), "run: m2m-proxy schema > routes.schema.json"


def test_the_example_routes_file_points_editors_at_the_schema() -> None:
    first = (ROOT / "routes.example.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=./routes.schema.json"
