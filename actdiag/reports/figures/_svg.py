"""The figures' look and their SVG: the matplotlib style, a blank `Figure`, and the post-processing that makes the
SVG small, deterministic and safe to inline."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ERROR_COLOR = "#c0392b"
ACT_COLOR = "#4c72b0"  # seaborn "deep" blue
GRAD_COLOR = "#dd8452"  # seaborn "deep" orange
OTHER_COLOR = "#55a868"  # seaborn "deep" green


@dataclass(frozen=True, slots=True)
class Rendered:
    """One figure as inline SVG markup plus a caption-friendly note (e.g. which layers a page shows)."""

    svg: str
    title: str = ""
    note: str = ""


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib
    import seaborn as sns

    rc: dict[str, Any] = {
        "svg.fonttype": "none",
        "text.parse_math": False,
        "font.family": "sans-serif",
        "font.size": 8,
        "axes.titlesize": 8,
        "axes.labelsize": 8,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "legend.fontsize": 7,
        "figure.dpi": 100,
        "savefig.dpi": 100,
    }
    with sns.axes_style("ticks"), matplotlib.rc_context(rc):  # type: ignore[arg-type]
        yield


def _figure(width: float, height: float, constrained: bool = True) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained" if constrained else None)


_SVG_HEADER = re.compile(r"^.*?(?=<svg)", re.S)
_SVG_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
_SVG_SIZE = re.compile(r'\s(width|height)="[^"]*"')
# Geometry at 1/100 of a point is finer than any screen; matplotlib writes six decimals. Only these attributes are
# rounded: text content (layer names) is never touched.
_GEOMETRY = re.compile(r'(\s(?:d|points|x|y|transform)=")([^"]*)"')
# Each text element repeats the whole font list; the report's stylesheet sets it once for all figures instead.
_FONT_FAMILY = re.compile(r"\s*font-family:[^;\"]*;?")
# matplotlib numbers every group ("axes_1", "line2d_3", ...) afresh in each figure: nothing refers to these ids (clip
# paths and markers use hashed ones), and several figures in one page would repeat them. Ids set here as `gid` have
# no "_<number>" tail and stay.
_AUTO_ID = re.compile(r'\sid="[A-Za-z][\w.]*_\d+"')
_NO_ROTATE = re.compile(r'\stransform="rotate\(-?0 [^"]*\)"')
_DECIMALS = re.compile(r"(\d\.\d)\d+")
_SPACES = re.compile(r"\s*([MLCQZz])\s*|\s+")


def _compact_geometry(m: re.Match[str]) -> str:
    """One geometry attribute (path, position, rotation) at 0.1 pt, a seventh of a pixel at the report's width, with
    no line breaks: coordinates written to six decimals are most of a figure's bytes."""
    if "matrix" in m.group(2) or "scale" in m.group(2):
        return m.group(0)  # image placement: small factors, where one decimal would move pixels
    value = _DECIMALS.sub(r"\1", m.group(2))
    value = _SPACES.sub(lambda s: s.group(1) or " ", value).strip()
    if m.group(1).endswith('d="'):
        value = _axis_moves(value)
    return f'{m.group(1)}{value}"'


_PATH_TOKEN = re.compile(r"([MLz])([^MLz]*)")


def _axis_moves(d: str) -> str:
    """Rewrite the line-tos of a move/line-only path as horizontal/vertical moves where they are (step outlines
    are nothing else), dropping line-tos to the current point and merging consecutive moves that continue in the
    same direction (a spike, up then down, stays two moves). Paths with curves are returned unchanged."""
    tokens = _PATH_TOKEN.findall(d)
    if "".join(c + a for c, a in tokens) != d:
        return d
    out: list[str] = []
    cur: tuple[str, str] | None = None
    run: tuple[str, float] | None = None  # the axis of the H/V move at out[-1], and where that move started
    for cmd, args in tokens:
        xy = args.split()
        if cmd == "L" and cur is not None and len(xy) == 2:
            x, y = xy
            if (x, y) == cur:
                continue
            if x == cur[0] or y == cur[1]:
                axis, frm, to = ("V", cur[1], y) if x == cur[0] else ("H", cur[0], x)
                if run is not None and run[0] == axis and (float(to) - float(frm)) * (float(frm) - run[1]) > 0:
                    out[-1] = axis + to
                else:
                    out.append(axis + to)
                    run = (axis, float(frm))
            else:
                out.append(f"L{x} {y}")
                run = None
            cur = (x, y)
            continue
        out.append(cmd + args)
        run = None
        cur = (xy[0], xy[1]) if len(xy) == 2 else None
    return "".join(out)


def to_svg(fig: Figure, salt: str) -> str:
    """The figure as an `<svg>` element for inlining: no XML prolog, no fixed size (CSS scales it), and ids made
    unique per figure so several inline SVGs in one page never share a clip-path id."""
    import matplotlib

    buf = io.StringIO()
    # The style again at save time: svg.fonttype is read when the figure is written, not when it is drawn.
    with _style(), matplotlib.rc_context({"svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = _SVG_HEADER.sub("", buf.getvalue(), count=1)
    # The RDF metadata block only names namespaces by URL; without it the page holds no URL but xmlns.
    svg = _SVG_METADATA.sub("", svg, count=1)
    svg = _NO_ROTATE.sub("", svg)
    svg = _AUTO_ID.sub("", svg)
    svg = _GEOMETRY.sub(_compact_geometry, svg)
    svg = _FONT_FAMILY.sub("", svg)
    head, sep, rest = svg.partition(">")
    # Never wider than drawn (text stays at its design size), narrower on small screens.
    vb = re.search(r'viewBox="0 0 ([\d.]+) ', head)
    width_px = round(float(vb.group(1)) * 4 / 3) if vb else 1000
    head = _SVG_SIZE.sub("", head) + f' class="fig" role="img" style="max-width: {width_px}px"'
    return head + sep + rest
