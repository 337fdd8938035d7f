"""YAML → data with marks: positions, ${VAR} expansion and problem rendering."""

from __future__ import annotations

from m2m_proxy.config.source import Mark, Problem, format_path, parse_yaml


def test_problem_renders_file_line_column_path_and_message() -> None:
    problem = Problem("r.yaml", Mark(3, 7), "routes[0].host", "bad; fix it")
    assert str(problem) == "r.yaml:3:7: routes[0].host: bad; fix it"


def test_problem_without_a_mark_or_path_renders_what_it_has() -> None:
    assert str(Problem("r.yaml", None, "proxy", "bad")) == "r.yaml: proxy: bad"
    assert str(Problem("r.yaml", Mark(1, 1), "", "bad")) == "r.yaml:1:1: bad"
    assert str(Problem("r.yaml", None, "", "bad")) == "r.yaml: bad"


def test_format_path_uses_dots_for_keys_and_brackets_for_indexes() -> None:
    assert format_path(("routes", 0, "client")) == "routes[0].client"
    assert format_path(("clients", "orders", "token_params", "tenant")) == (
        "clients.orders.token_params.tenant"
    )
    assert format_path(()) == ""


def test_marks_are_one_based_for_keys_and_values() -> None:
    doc = parse_yaml("proxy:\n  listen: 127.0.0.1:8080\nroutes:\n  - host: a\n", "r.yaml", {})
    assert doc.problems == []
    assert doc.data == {"proxy": {"listen": "127.0.0.1:8080"}, "routes": [{"host": "a"}]}
    assert doc.key_marks[("proxy", "listen")] == Mark(2, 3)
    assert doc.value_marks[("proxy", "listen")] == Mark(2, 11)
    assert doc.value_marks[("routes", 0, "host")] == Mark(4, 11)


def test_mark_for_a_missing_path_falls_back_to_its_nearest_ancestor() -> None:
    doc = parse_yaml("clients:\n  orders:\n    client_id: a\n", "r.yaml", {})
    assert doc.mark_for(("clients", "orders", "token_url")) == Mark(3, 5)
    assert doc.mark_for(("clients", "orders"), key=True) == Mark(2, 3)


def test_expansion_happens_in_values_not_keys_and_not_in_numbers() -> None:
    doc = parse_yaml("${K}: ${V}\nn: 5\n", "r.yaml", {"K": "key", "V": "value"})
    assert doc.data == {"${K}": "value", "n": 5}


def test_an_unclosed_reference_and_a_lone_dollar_are_kept_as_text() -> None:
    doc = parse_yaml("a: ${OPEN\nb: cost $5\n", "r.yaml", {"OPEN": "x"})
    assert doc.problems == []
    assert doc.data == {"a": "${OPEN", "b": "cost $5"}


def test_each_unset_reference_in_one_value_is_a_problem() -> None:
    doc = parse_yaml("a: ${ONE}-${TWO}\n", "r.yaml", {})
    assert doc.data == {"a": "-"}
    assert [p.message.split(";")[0] for p in doc.problems] == [
        "environment variable ONE is not set",
        "environment variable TWO is not set",
    ]
    assert {p.path for p in doc.problems} == {"a"}


def test_invalid_yaml_yields_one_problem_and_no_data() -> None:
    doc = parse_yaml("a: [1,\n", "r.yaml", {})
    assert doc.data is None
    assert len(doc.problems) == 1
    assert doc.problems[0].message.startswith("invalid YAML: ")
