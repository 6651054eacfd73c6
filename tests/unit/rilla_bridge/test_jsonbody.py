"""Reading a webhook body as a JSON object (``rilla_bridge.jsonbody``), as intake and the
worker both do: strict where the sender is broken, lenient where one odd value should not cost
a call."""

from __future__ import annotations

import pytest

from rilla_bridge.jsonbody import MAX_INT_DIGITS, parse_object


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "empty body: expected a JSON object"),
    (b"\xff", "body is not valid UTF-8"),
    (b'{"a": "\xc3"}', "body is not valid UTF-8"),
    (b"{", "body is not valid JSON"),
    (b"[" * 100_000, "body is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "body is not valid JSON"),     # too deep
    (b"[]", "body must be a JSON object"),
    (b"null", "body must be a JSON object"),
    (b'"text"', "body must be a JSON object"),
    (b"\xef\xbb\xbf", "body is not valid JSON"),                     # a mark and nothing
    (b"\xef\xbb\xbf\xef\xbb\xbf{}", "body is not valid JSON"),       # one mark, not two
    (b"\xff\xfe{\x00}\x00", "body is not valid UTF-8"),             # UTF-16 is not UTF-8
])
def test_parse_object_says_why(raw: bytes, reason: str) -> None:
    assert parse_object(raw) == reason
    assert parse_object(b'{"a": [1]}') == {"a": [1]}


def test_a_leading_byte_order_mark_is_accepted() -> None:
    assert parse_object(b'\xef\xbb\xbf{"resource_id": "CAL1", "duration": 12}') == {
        "resource_id": "CAL1", "duration": 12}


@pytest.mark.parametrize("raw", [
    b'{"duration": NaN}', b'{"duration": Infinity}', b'{"duration": -Infinity}',
    b'{"a": [1, NaN]}', b"NaN",
])
def test_nan_and_infinity_are_not_json(raw: bytes) -> None:
    assert parse_object(raw) == "body is not valid JSON"


def test_an_integer_too_long_to_be_real_is_a_missing_field_not_a_bad_body() -> None:
    longest = "9" * MAX_INT_DIGITS
    assert MAX_INT_DIGITS == 40
    got = parse_object(b'{"id": ' + longest.encode() + b', "n": -' + longest.encode()
                       + b', "huge": ' + b"1" * 5000 + b', "neg": -' + b"7" * 41
                       + b', "list": [1, ' + b"2" * 41 + b"]}")
    assert got == {"id": int(longest), "n": -int(longest), "huge": None, "neg": None,
                   "list": [1, None]}
    assert parse_object(b"1" * 10_000) == "body must be a JSON object"   # None is no object


def test_a_float_out_of_range_is_a_missing_field() -> None:
    assert parse_object(b'{"a": 1e400, "b": -1e400, "c": 1.5, "d": 1e-400}') == {
        "a": None, "b": None, "c": 1.5, "d": 0.0}
