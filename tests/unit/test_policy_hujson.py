"""The HuJSON reader: JSON plus comments and trailing commas, with line and column on every error."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.control.policy import Policy, PolicyError
from tailpy.control.policy.hujson import KEY, HuJSONError, parse


def test_comments_and_trailing_commas() -> None:
    doc = parse(
        """// leading comment
        {
          /* block
             comment */ "a": [1, 2.5, -3e2, true, false, null,],   // trailing comma in an array
          "b": {"c": "d\\n\\u00e9\\ud83d\\ude00",},
        }
        """
    )
    assert doc.value == {"a": [1, 2.5, -300.0, True, False, None], "b": {"c": "d\né😀"}}


def test_positions_of_values_and_keys() -> None:
    doc = parse('{\n  "acls": [\n    {"src": ["group:x"]}\n  ]\n}')
    assert doc.position(("acls", 0, "src", 0)) == (3, 14)
    assert doc.position(("acls", KEY, "missing")) == (2, 11)  # nearest recorded: the list
    assert doc.position(("acls",)) == (2, 11)
    assert doc.position((KEY, "acls")) == (2, 3)


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ("{", 1, 2, "'}' is missing"),
        ('{"a": 1,, }', 1, 9, "expected a quoted object key"),
        ('{"a": 1 "b": 2}', 1, 9, "expected ',' or '}'"),
        ('{"a": 1, "a": 2}', 1, 10, "duplicate key 'a'"),
        ("[1, 2", 1, 6, "expected ',' or ']'"),
        ("/* open", 1, 1, "unterminated /* comment"),
        ('"abc', 1, 1, "unterminated string"),
        ('{"a": 01}', 1, 8, "expected ',' or '}'"),
        ("{}\n  x", 2, 3, "unexpected text after the end"),
        ('"\\x"', 1, 2, "bad escape"),
        ("[,]", 1, 2, "expected a value"),
        ("", 1, 1, "a value is missing"),
    ],
)
def test_errors_carry_line_and_column(text: str, line: int, column: int, message: str) -> None:
    with pytest.raises(HuJSONError) as e:
        parse(text)
    assert (e.value.line, e.value.column) == (line, column)
    assert message in e.value.message


def test_depth_is_bounded() -> None:
    with pytest.raises(HuJSONError, match="nested deeper"):
        parse("[" * 1000 + "]" * 1000)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
    max_leaves=20,
)


@given(json_values)
@settings(max_examples=200)
def test_plain_json_reads_as_json(v: object) -> None:
    text = json.dumps(v)
    assert parse(text).value == json.loads(text)


@given(st.text(max_size=200))
@settings(max_examples=500)
def test_only_policy_error_escapes_from_text(text: str) -> None:
    with contextlib.suppress(PolicyError):
        Policy.parse(text)


_TOKENS = st.sampled_from(
    [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        '"acls"',
        '"src"',
        '"dst"',
        '"*"',
        '"*:*"',
        '"group:x"',
        '"tag:a"',
        '"groups"',
        '"tagOwners"',
        '"grants"',
        '"ip"',
        '"tests"',
        '"accept"',
        '"action"',
        '"proto"',
        "1",
        "null",
        "true",
        "// c\n",
        "/* c */",
        '"22,80-90"',
        '"tcp:22"',
        '"autogroup:self:*"',
        '"alice@"',
        '"hosts"',
        '"10.0.0.0/8"',
        '"group:x"',
    ]
)


@given(st.lists(_TOKENS, max_size=40))
@settings(max_examples=1000)
def test_only_policy_error_escapes_from_tokens(tokens: list[str]) -> None:
    with contextlib.suppress(PolicyError):
        Policy.parse(" ".join(tokens))
