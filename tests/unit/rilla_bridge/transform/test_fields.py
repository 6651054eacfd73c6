from __future__ import annotations

from typing import Any

import pytest

from rilla_bridge.transform.fields import (
    add_seconds,
    clean_bool,
    clean_id,
    clean_int,
    clean_scalar,
    clean_seconds,
    clean_tags,
    clean_text,
    naive_utc,
    seconds_field,
    to_utc,
)


@pytest.mark.parametrize(("raw", "expected"), [
    (True, True), (False, False), ("true", True), ("false", False), ("TRUE", True),
    ("1", True), ("0", False), (1, True), (0, False), ("", None), (None, None), ("maybe", None),
    (2, None), ([], None),
])
def test_clean_bool_reads_string_booleans(raw: Any, expected: bool | None) -> None:
    assert clean_bool(raw) is expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("247", 247), (247, 247), (" 13 ", 13), (13.0, 13), ("0", 0), ("", None), ("4m 7s", None),
    (-5, None), (True, None), (float("nan"), None), ("12.0", 12), (None, None),
])
def test_clean_int_reads_string_numbers(raw: Any, expected: int | None) -> None:
    assert clean_int(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("312", 312), (312, 312), (95.5, 96), ("95.5", 96), (95.49, 95), (" 13 ", 13), (0, 0),
    ("0.4", 0), (86400, 86400), ("86400.4", "'86400.4'"), (13.0, 13),
    (None, None), ("", None), ("  ", None),
    # not a call's length: the value comes back as text, to be named on the timeline
    ("1e9", "'1e9'"), ("-5", "'-5'"), (-5, "-5"), (-0.5, "-0.5"), ("86401", "'86401'"),
    (86400.6, "86400.6"), (10 ** 12, "1000000000000"), ("4m 7s", "'4m 7s'"), ("95.", "'95.'"),
    ("+5", "'+5'"), (float("inf"), "inf"), (float("nan"), "nan"), (True, "True"),
    ([1], "[1]"), ({"s": 1}, "{'s': 1}"), ("9" * 100, "'" + "9" * 39 + "..."),
])
def test_clean_seconds_rounds_counts_and_names_the_rest(raw: Any,
                                                        expected: int | str | None) -> None:
    assert clean_seconds(raw) == expected
    assert seconds_field(clean_seconds(raw)) == (
        (None, expected) if isinstance(expected, str) else (expected, None))


@pytest.mark.parametrize(("raw", "expected"), [
    ("", None), ("   ", None), (" Maria ", "Maria"), (766970532, "766970532"), (1.5, "1.5"),
    (None, None), ({"a": 1}, None), (True, None), (float("inf"), None),
])
def test_clean_text_treats_empty_as_missing(raw: Any, expected: str | None) -> None:
    assert clean_text(raw) == expected


def test_clean_scalar_keeps_type_and_drops_containers() -> None:
    assert clean_scalar(12.5) == 12.5
    assert clean_scalar(False) is False
    assert clean_scalar(" $100 ") == "$100"
    assert clean_scalar(["x"]) is None
    assert clean_scalar("") is None


def test_clean_tags_accepts_strings_and_objects() -> None:
    assert clean_tags(["a", "b", "a", ""]) == ["a", "b"]
    assert clean_tags([{"id": 1, "name": "estimate-booked"}, {"id": 2}, "x"]) == [
        "estimate-booked", "x"]
    assert clean_tags({"id": 3, "name": "Appointment Set"}) == ["Appointment Set"]
    assert clean_tags([]) is None
    assert clean_tags(7) is None


def test_clean_id_refuses_path_unsafe_values() -> None:
    assert clean_id(766970532) == "766970532"
    assert clean_id("CAL4f1c9e27b3a84d6f9e0d2c5a7b18e3f6") == "CAL4f1c9e27b3a84d6f9e0d2c5a7b18e3f6"
    assert clean_id("../../admin") is None
    assert clean_id("") is None
    assert clean_id(True) is None


@pytest.mark.parametrize(("raw", "expected"), [
    # The offset in the value is what counts, whatever company_time_zone says.
    ("2018-02-19T13:41:00.236-05:00", "2018-02-19 18:41:00"),
    ("2025-03-11T09:42:17-07:00", "2025-03-11 16:42:17"),
    ("2026-01-29T18:02:05-03:00", "2026-01-29 21:02:05"),
    ("2025-12-31T23:30:00-02:00", "2026-01-01 01:30:00"),
    ("2025-03-11T14:42:17Z", "2025-03-11 14:42:17"),
    ("2025-03-11T14:42:17", None),           # no offset: refused, not guessed
    ("2025-13-45T10:00:00-05:00", None),
    ("2025-13-45", None),
    ("yesterday", None),
    ("0001-01-01T00:00:00+01:00", None),     # leaves the calendar when converted
])
def test_to_utc_uses_the_offset_in_the_value(raw: str, expected: str | None) -> None:
    assert to_utc(raw) == expected


def test_naive_utc_reads_legacy_datetime_as_utc() -> None:
    assert naive_utc("2018-02-19 18:41:00") == "2018-02-19 18:41:00"
    assert naive_utc("2018-02-19T18:41:00") is None
    assert naive_utc("") is None


def test_add_seconds_crosses_midnight_and_guards_overflow() -> None:
    assert add_seconds("2025-03-11 23:59:00", 247) == "2025-03-12 00:03:07"
    assert add_seconds("9999-12-31 23:59:59", 5) is None
