"""The console table never splits a word or a number: lines break at spaces or after the "=" of a "name=value"
item; a chunk wider than its column widens the column (up to a cap), beyond that it is cut with an ellipsis."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from actdiag.records import Finding, Fix
from actdiag.reports import console
from actdiag.reports.console import ELLIPSIS, MAX_NAME_WIDTH, _wrap, findings_table, format_evidence

STALL = Finding(
    code="stalled_updates",
    severity="warning",
    layer="encoder.layers.11.attention.output_proj",
    message="The optimizer's effective step fell to 0.0334 of its first value over 200 steps.",
    evidence={"effective_step_decay": 0.0334, "update_ratio": 2.5e-7, "steps": 200},
    fixes=(Fix(code="lower_learning_rate", text="Switch to an optimizer without decay: torch.optim.Adam."),),
)


def _cells(table: str) -> str:
    return "\n".join(table.splitlines()[2:])


def test_the_reported_case_reads_whole() -> None:
    """`effective_step_decay=0.0` over `334` read as 0.0: the number must be on one line, whole."""
    for width in (60, 80, 100, 140):
        table = findings_table([STALL], width=width)
        assert "0.0334" in table, width
        assert not re.search(r"0\.0\s*$", table, re.M), width
        assert "2.50e-07" in table


def test_long_layer_name_widens_its_column() -> None:
    table = findings_table([STALL], width=100)
    assert STALL.layer in table  # 39 characters: within the cap, the column grows rather than splitting it


def test_overlong_name_is_cut_with_an_ellipsis_keeping_its_end() -> None:
    name = "model." + ".".join(f"block{i}" for i in range(12)) + ".proj"
    assert len(name) > MAX_NAME_WIDTH
    table = findings_table([Finding(code="dead_relu", severity="warning", layer=name, message="m")], width=100)
    line = next(ln for ln in table.splitlines() if ELLIPSIS in ln)
    shown = line.split()[2]
    assert shown.startswith(ELLIPSIS) and name.endswith(shown[1:])
    assert len(shown) == MAX_NAME_WIDTH


def test_evidence_item_breaks_after_its_equals_sign_only() -> None:
    assert _wrap("effective_step_decay=0.0334", 24) == ["effective_step_decay=", "0.0334"]
    assert _wrap("a=1 b=2", 3) == ["a=1", "b=2"]
    assert _wrap("ratio=3.27e-07", 40) == ["ratio=3.27e-07"]


def test_rich_table_keeps_numbers_whole_and_is_never_cropped() -> None:
    for width in (40, 60, 80, 120):
        drawn = console._rich_table([STALL], width, {})
        assert drawn is not None
        plain = re.sub(r"\x1b\[[0-9;]*m", "", drawn)
        assert "0.0334" in plain and "2.50e-07" in plain and "torch.optim.Adam." in plain
        assert all(line.rstrip()[-1] in "\u2513\u2503\u2529\u2502\u2518" for line in plain.splitlines()), plain


_word = st.text(alphabet="abcdefghij_.0123456789", min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_word, st.floats(allow_nan=False, allow_infinity=False)), min_size=1, max_size=6),
    st.lists(_word, min_size=1, max_size=12),
    st.integers(min_value=40, max_value=160),
)
def test_no_chunk_is_ever_split(evidence: list[tuple[str, float]], words: list[str], width: int) -> None:
    """Every word of the message and every number of the evidence appears whole on one line of the table (or cut
    with an ellipsis when longer than the cap), whatever the width."""
    finding = Finding(
        code="saturation",
        severity="warning",
        layer=words[0],
        message=" ".join(words),
        evidence=dict(evidence),
    )
    table = _cells(findings_table([finding], width=width))
    tokens = set(table.split())
    shown = format_evidence(finding.evidence, sep="\n")
    for item in shown.split("\n"):
        if item == "...":
            continue
        key, _, value = item.partition("=")
        assert item in tokens or (f"{key}=" in tokens and value in tokens), (item, table)
    for word in words:
        assert word in tokens or any(t.startswith(ELLIPSIS) or t.endswith(ELLIPSIS) for t in tokens), (word, table)
