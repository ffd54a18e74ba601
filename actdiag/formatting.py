"""How a number reads in a message, a table or a report: one formatter for the rules, the console and the HTML."""

from __future__ import annotations

import math


def format_number(value: object, digits: int = 3) -> str:
    """`digits` significant digits, in scientific notation when tiny (below 1e-3) or large (1e4 and up); integers
    in full with thousands separators; anything that is not a number as `str()` gives it.

    format_number(0.25) == "0.25", format_number(1.5e-6) == "1.50e-06", format_number(1234567) == "1,234,567".
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)  # nan, inf, -inf
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits}g}"
    return f"{value:.{digits - 1}e}"
