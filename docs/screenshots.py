"""Regenerate the README's screenshots from real runs (docs/images/report*.png, tensorboard*.png, notebook.png,
terminal*.png).

    python docs/screenshots.py            # needs chromium; writes into docs/images/
    python docs/screenshots.py tensorboard_actdiag.png      # only the images named

It inspects examples/tanh_mlp.py (the HTML report, with --try-fixes: its findings and histograms by depth), trains a
7-layer ReLU network two of whose layers are dead under actdiag.watch (the report's gradient flow, dead units and weight
norms), trains tanh_mlp for a few dozen steps under actdiag.watch with a logdir, serves that logdir with a real
`tensorboard` on 127.0.0.1 and photographs the pages with headless Chromium (TensorBoard's own tabs and actdiag's
dashboard). The notebook view is the `_repr_html_` of the tanh_mlp report on a page of its own; the terminal views are
the real `python -m actdiag inspect --layers` and `actdiag diff` (tanh_mlp before and after Xavier initialisation)
output, set in a monospace font. Everything runs locally; nothing is fetched.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from actdiag.records import Report

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MAX_BYTES = 300_000


def dead_relu_run(path: Path) -> Path:
    """Seven Linear+ReLU blocks whose 3rd and 5th are shifted to -100 (their units never fire), trained for 40 steps
    under watch: the run the report's unit-health and gradient figures were checked on. Returns the HTML report."""
    import actdiag

    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for i in range(7):
        linear = nn.Linear(64, 64)
        if i in (2, 4):
            nn.init.constant_(linear.bias, -100.0)
        blocks += [linear, nn.ReLU()]
    model = nn.Sequential(*blocks, nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-2)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    with actdiag.watch(model, every=4) as monitor:
        for _ in range(40):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    return monitor.save_html(path)


def section_png(html: Path, sections: tuple[str, ...], width: int, height: int, profile: Path, hide: str = "") -> bytes:
    """Some sections of a report (by id) with the rest hidden (and `hide`, a CSS selector, within them): the figures
    as a reader scrolling to them sees them. (Headless Chromium paints a blank page when asked to screenshot a URL
    with a #fragment.)"""
    keep = "".join(f":not(#{s})" for s in sections)
    hidden = f"main > header, main > footer, main > section{keep}" + (f", {hide}" if hide else "")
    css = f"<style>{hidden} {{ display: none; }}</style>"
    page = profile / f"{html.stem}-{'-'.join(sections)}.html"
    page.write_text(html.read_text().replace("</head>", css + "</head>", 1))
    return chromium_png(page.as_uri(), width, height, profile)


def chromium_png(url: str, width: int, height: int, profile: Path, wait_ms: int = 0) -> bytes:
    shot = profile / "shot.png"
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile / 'chromium'}",
        f"--window-size={width},{height}",
        f"--screenshot={shot}",
    ]
    if wait_ms:
        args.append(f"--virtual-time-budget={wait_ms}")
    subprocess.run([*args, url], check=True, timeout=180, capture_output=True)
    return shot.read_bytes()


def save_small(png: bytes, path: Path) -> None:
    """Save as an optimised palette PNG, scaled down until it is under MAX_BYTES (unless other images were asked
    for on the command line)."""
    if sys.argv[1:] and path.name not in sys.argv[1:]:
        return
    img = Image.open(io.BytesIO(png)).convert("RGB")
    scale = 1.0
    while True:
        size = (int(img.width * scale), int(img.height * scale))
        buf = io.BytesIO()
        img.resize(size, Image.LANCZOS).quantize(colors=128, dither=Image.Dither.NONE).save(buf, "PNG", optimize=True)
        if buf.tell() <= MAX_BYTES or scale < 0.4:
            break
        scale *= 0.9
    path.write_bytes(buf.getvalue())
    print(f"{path.relative_to(ROOT)}: {size[0]}x{size[1]}, {buf.tell() / 1000:.0f} kB")


FIXED_TANH_MLP = """\
from torch import nn

from tanh_mlp import build_model as _build, example_input  # noqa: F401


def build_model() -> nn.Module:
    # The fix actdiag suggests for tanh_mlp: Xavier initialisation with tanh's gain.
    model = _build()
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight, gain=nn.init.calculate_gain("tanh"))
    return model
"""


def page_png(body: str, width: int, height: int, profile: Path, name: str, style: str = "") -> bytes:
    """A page of `body` on white, photographed at `width` x `height`."""
    page = profile / name
    css = "body { margin: 16px; background: #fff; color: #111; font-family: sans-serif; }" + style
    page.write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>{css}</style></head><body>{body}</body></html>'
    )
    return chromium_png(page.as_uri(), width, height, profile)


def terminal_png(text: str, width: int, height: int, profile: Path, name: str) -> bytes:
    """Terminal output as a reader sees it: dark on light, monospace."""
    import html

    style = (
        "pre { font-family: 'DejaVu Sans Mono', 'Liberation Mono', monospace; font-size: 13px; line-height: 1.25;"
        " background: #f6f6f4; border: 1px solid #ddd; border-radius: 6px; padding: 12px 14px; margin: 0; }"
    )
    return page_png(f"<pre>{html.escape(text)}</pre>", width, height, profile, name, style)


def actdiag_cli(*args: str, cwd: Path) -> str:
    """`python -m actdiag ARGS` as a user runs it (plain output: stdout is a pipe), with the command line on top."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples")]), PYTHONIOENCODING="utf-8")
    env.pop("NO_COLOR", None)
    run = subprocess.run(
        [sys.executable, "-m", "actdiag", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if run.returncode not in (0, 1):
        raise RuntimeError(f"actdiag {' '.join(args)} exited {run.returncode}: {run.stderr.strip()}")
    return f"$ actdiag {' '.join(args)}\n{run.stdout.rstrip()}\n"


def terminal_shots(work: Path) -> None:
    """`actdiag inspect --layers` of tanh_mlp, and `actdiag diff` of tanh_mlp before and after its fix."""
    shutil.copy(ROOT / "examples" / "tanh_mlp.py", work / "tanh_mlp.py")
    (work / "tanh_mlp_fixed.py").write_text(FIXED_TANH_MLP)
    layers = actdiag_cli("inspect", "tanh_mlp.py", "--layers", "--seed", "0", cwd=work)
    # Up to the findings table: the fix code printed below it would make the image twice as tall.
    layers = layers.split("\nfix for ", 1)[0].rstrip() + "\n"
    save_small(
        terminal_png(layers, 880, 50 + 33 * layers.count("\n") // 2, work, "layers.html"), OUT / "terminal_layers.png"
    )
    actdiag_cli("inspect", "tanh_mlp.py", "--seed", "0", "--quiet", "--json", "before.json", cwd=work)
    actdiag_cli("inspect", "tanh_mlp_fixed.py", "--seed", "0", "--quiet", "--json", "after.json", cwd=work)
    diff = actdiag_cli("diff", "before.json", "after.json", cwd=work)
    save_small(terminal_png(diff, 880, 50 + 33 * diff.count("\n") // 2, work, "diff.html"), OUT / "terminal_diff.png")


def notebook_shot(report: Report, work: Path) -> None:
    """What a notebook shows for a Report as a cell's last value: its _repr_html_ under the cell that made it."""
    cell = (
        '<pre style="font-family: monospace; font-size: 13px; background: #f5f5f5; border: 1px solid #e0e0e0;'
        ' padding: 8px 10px; margin: 0 0 12px;">'
        "report = actdiag.inspect(tanh_mlp.build_model(), tanh_mlp.example_input(), try_fixes=True)\nreport</pre>"
    )
    save_small(page_png(cell + report._repr_html_(), 1000, 730, work, "notebook.html"), OUT / "notebook.png")


def tensorboard_env(work: Path) -> dict[str, str]:
    """An environment in which `tensorboard` finds actdiag's dashboard from this checkout. An actdiag installed from
    before the plugin lacks the entry point; then a minimal distribution that declares only it goes on the path."""
    from importlib import metadata

    env = dict(os.environ)
    paths = [str(ROOT)]
    entry = "actdiag.reports.tbplugin:ActdiagLoader"
    if not any(ep.value == entry for ep in metadata.entry_points(group="tensorboard_plugins")):
        dist = work / "entry-point" / "actdiag_tb_shots-0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: actdiag-tb-shots\nVersion: 0\n")
        (dist / "entry_points.txt").write_text(f"[tensorboard_plugins]\nactdiag = {entry}\n")
        paths.append(str(dist.parent))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def train_under_watch(logdir: Path) -> None:
    import tanh_mlp

    import actdiag

    torch.manual_seed(0)
    model = tanh_mlp.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = tanh_mlp.example_input()
    y = torch.randint(0, tanh_mlp.CLASSES, (x.shape[0],))
    with actdiag.watch(model, every=3, logdir=logdir) as monitor:
        for _ in range(60):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step()


def main() -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
    import tanh_mlp

    import actdiag

    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="actdiag-shots-"))
    try:
        report = actdiag.inspect(tanh_mlp.build_model(), tanh_mlp.example_input(), try_fixes=True)
        notebook_shot(report, work)
        terminal_shots(work)
        html = report.save_html(work / "report.html")
        save_small(chromium_png(html.as_uri(), 1200, 1500, work), OUT / "report.png")
        save_small(section_png(html, ("histograms",), 1200, 700, work), OUT / "report_depth.png")
        dead = dead_relu_run(work / "dead_relu.html")
        save_small(section_png(dead, ("flow", "units"), 1200, 1000, work), OUT / "report_units.png")
        weights_only = "#time > figure:not(#weights)"
        save_small(section_png(dead, ("time",), 1200, 520, work, hide=weights_only), OUT / "report_weights.png")

        if sys.argv[1:] and not any(name.startswith("tensorboard") for name in sys.argv[1:]):
            return  # no TensorBoard image asked for: skip the training run and the server
        logdir = work / "runs" / "tanh_mlp"
        train_under_watch(logdir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
        ]
        server = subprocess.Popen(cmd, env=tensorboard_env(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(120):
                try:
                    with urllib.request.urlopen(f"{base}/data/plugin/histograms/tags", timeout=5) as r:
                        if b"activations" in r.read():
                            break
                except OSError:
                    pass
                time.sleep(0.5)
            for name, fragment, size in (
                ("tensorboard.png", "#histograms", (1400, 1000)),
                ("tensorboard_scalars.png", "#custom_scalars", (1400, 1000)),
                ("tensorboard_findings.png", "#text", (1400, 600)),
                ("tensorboard_actdiag.png", "#actdiag", (1400, 2300)),
            ):
                png = chromium_png(f"{base}/{fragment}", *size, work, wait_ms=15000)
                save_small(png, OUT / name)
        finally:
            server.kill()
            server.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
