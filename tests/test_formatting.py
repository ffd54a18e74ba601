"""The one number formatter: what messages, the console and the HTML report show for a number."""

from __future__ import annotations

import math

import pytest

from actdiag.formatting import format_number
from actdiag.reports import console, html
from actdiag.rules import _common


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.25, "0.25"),
        (1.0, "1"),
        (0.0, "0"),
        (-0.0, "0"),
        (1.5e-6, "1.50e-06"),
        (-2.5e-4, "-2.50e-04"),
        (123456.0, "1.23e+05"),
        (12345.0, "1.23e+04"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (1234567, "1,234,567"),
        (True, "True"),
        ("text", "text"),
    ],
)
def test_format_number(value: object, text: str) -> None:
    assert format_number(value) == text


def test_more_digits_keep_the_same_notation_rule() -> None:
    assert format_number(0.123456, digits=4) == "0.1235"
    assert format_number(2e-7, digits=4) == "2.000e-07"


def test_every_reader_uses_the_one_formatter() -> None:
    assert _common.fmt is format_number
    assert console.format_number is format_number
    assert html.fmt(0.123456) == format_number(0.123456, digits=4)
