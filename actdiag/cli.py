"""The command line: click only. Parse, call the library, pick sinks, set the exit status.

Exit status (shared/CONTRACT.md section 2): 0 ran and nothing at or above --fail-on; 1 findings at or above
--fail-on; 2 the target could not be loaded or run (or a bad option); 3 an internal error of actdiag.

Nothing heavy is imported at module level: `actdiag --help` and `--version` must answer without importing torch,
which alone takes seconds. The library is imported inside the command.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from actdiag._version import __version__

if TYPE_CHECKING:
    from actdiag.records import Finding, Report

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_TARGET = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

FAIL_ON = ("never", "info", "warning", "error")
F = TypeVar("F", bound=Callable[..., Any])
# Kept in step with actdiag.inputs.DTYPES (a test checks): importing that module here would import torch.
INPUT_DTYPES = (
    "float32",
    "float",
    "float64",
    "double",
    "float16",
    "half",
    "bfloat16",
    "int64",
    "long",
    "int32",
    "int",
    "int16",
    "int8",
    "uint8",
    "bool",
)
REPORT_BUG = (
    "This is a bug in actdiag, not in your model. Please report it, with the command you ran and the output of "
    "the same command with --debug."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, "-V", "--version", prog_name="actdiag")
def cli() -> None:
    """actdiag: find why a PyTorch network does not train (vanishing gradients, saturation, dead ReLUs, ...).

    `actdiag inspect model.py` executes model.py as Python, like `python model.py` would (without its
    `if __name__ == "__main__":` block), runs the model it defines on example inputs, and reports what looks wrong
    with its activations and gradients, with fixes. See `actdiag inspect --help`.
    """


# ----------------------------------------------------------------------------------------------- option parsing
def _fail_on_option(help_text: str) -> Callable[[F], F]:
    """--fail-on, the same choices for `inspect` and `diff`; the help says what counts as a finding there."""
    return click.option("--fail-on", type=click.Choice(FAIL_ON), default="never", show_default=True, help=help_text)


def _shapes(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    out = []
    for text in values:
        try:
            out.append(_parse_shape(text))
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return tuple(out)


def _range(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a range; write LOW,HIGH, e.g. 0,30000", ctx, param) from None
    if not low < high:
        raise click.BadParameter(f"{value!r} is not a range: LOW must be below HIGH", ctx, param)
    return low, high


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a shape; write the sizes separated by commas, e.g. 16,3,32,32") from None
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"{text!r} is not a shape; sizes must be positive integers, e.g. 16,3,32,32")
    return dims


def _check_output_path(path: str | None, option: str, folder: bool = False) -> None:
    """Fail before running (exit 2) when a report could not be written later; creates nothing."""
    if path is None or path == "-":
        return
    p = Path(path)
    if not folder and p.is_dir():
        raise click.BadParameter(f"{path!r} is a directory; give a file name", param_hint=option)
    if folder and p.exists() and not p.is_dir():
        raise click.BadParameter(f"{path!r} is a file, not a folder", param_hint=option)
    parent = p if folder and p.is_dir() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise click.BadParameter(f"{path!r} cannot be written ({parent} is not a writable folder)", param_hint=option)


class _Outputs:
    """The files this run writes. On failure, everything it wrote is removed again: reports it saved, and files
    that appeared in --logdir during the run (a folder it created goes too); files that were there before stay."""

    def __init__(self, json_path: str | None, html_path: str | None, logdir: str | None) -> None:
        self.json_path = json_path
        self.html_path = html_path
        self.logdir = Path(logdir) if logdir is not None else None
        self.written: list[Path] = []
        self._logdir_existed = False
        self._before: set[Path] = set()

    def check(self) -> None:
        _check_output_path(self.json_path, "--json")
        _check_output_path(self.html_path, "--html")
        if self.logdir is not None:
            _check_output_path(str(self.logdir), "--logdir", folder=True)
            self._logdir_existed = self.logdir.exists()
            if self._logdir_existed:
                self._before = set(self.logdir.rglob("*"))

    def write(self, report: Report) -> None:
        if self.json_path is not None and self.json_path != "-":
            self.written.append(Path(self.json_path))
            report.save_json(self.json_path)
        if self.html_path is not None:
            self.written.append(Path(self.html_path))
            report.save_html(self.html_path)

    def cleanup(self) -> None:
        for p in self.written:
            if p.is_file():
                p.unlink()
        self.written = []
        if self.logdir is None or not self.logdir.exists():
            return
        new = sorted(set(self.logdir.rglob("*")) - self._before, key=lambda q: len(q.parts), reverse=True)
        for p in new:  # deepest first, so folders are empty when their turn comes
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
            elif p.is_file() or p.is_symlink():
                p.unlink()
        if not self._logdir_existed and not any(self.logdir.iterdir()):
            self.logdir.rmdir()


# ----------------------------------------------------------------------------------------------- inspect
INSPECT_HELP = """Check a model for training problems: run it on example inputs and report what looks wrong.

TARGET is path/to/model.py, path/to/model.py:NAME or package.module:NAME. The file is executed as Python, like
`python model.py` would run it (its folder first on sys.path), except that its `if __name__ == "__main__":` block
does not run. Only inspect files you trust.

The model is, in order: NAME if given; build_model(), get_model() or create_model(); an nn.Module named `model`; the
only nn.Module instance, else the only nn.Module class that needs no arguments. Its input is what example_input()
returns (a tensor, a tuple of tensors, or a dict of keyword tensors), or random data from --input-shape, which wins
when both exist. loss_fn(output, inputs) is used when the file has one (loss_fn(output, inputs, target) with what
example_target() returns, when the file has that too); without it, the backward pass starts from a random
unit-variance gradient at the output.

Thresholds of the rules come from actdiag's defaults, then [tool.actdiag.thresholds] in the pyproject.toml nearest
to the model file (its folder or the first folder above it that has one), then --threshold NAME=VALUE.

\b
Exit status:
  0  ran; no finding at or above --fail-on
  1  findings at or above --fail-on
  2  the target could not be loaded or run (the cause is printed), or a bad option
  3  an internal error of actdiag

\b
Examples:
  actdiag inspect examples/tanh_mlp.py
  actdiag inspect model.py:Net --input-shape 16,3,32,32 --html report.html --fail-on error
  actdiag inspect lm.py --input-shape 8,128 --input-dtype long --input-range 0,32000
  actdiag inspect model.py --checkpoint last.ckpt --steps 20 --optimizer adam --json report.json
  actdiag inspect model.py --layers --threshold saturation_fraction_at_least=0.3
"""


@cli.command("inspect", help=INSPECT_HELP, no_args_is_help=True)
@click.argument("target")
@click.option("--json", "json_path", metavar="PATH", help="Write the JSON report here ('-' for standard output).")
@click.option("--html", "html_path", metavar="PATH", help="Write the HTML report here.")
@click.option("--logdir", metavar="DIR", help="Write TensorBoard event files into this folder.")
@click.option(
    "--steps", type=click.IntRange(min=1), default=1, show_default=True, help="Forward/backward passes to run."
)
@click.option(
    "--optimizer",
    type=click.Choice(["none", "sgd", "adam"]),
    default="none",
    show_default=True,
    help="Update the weights after each pass (on loss_fn, or on the synthetic gradient), to see units die or "
    "saturate after a few updates.",
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate (default: sgd 0.01, adam 1e-3).")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where to run."
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="16,3,32,32",
    callback=_shapes,
    help="Random input of this shape; repeat for several positional inputs.",
)
@click.option(
    "--input-dtype",
    "input_dtypes",
    multiple=True,
    type=click.Choice(INPUT_DTYPES),
    metavar="DTYPE",
    help="Dtype of the --input-shape inputs: float32 (default), float64, float16, bfloat16, long (int64), int32, "
    "int16, int8, uint8, bool; once for all inputs, or once per input. Integer inputs (e.g. token ids) are drawn "
    "from --input-range, else from [0, vocabulary size) of the model's first nn.Embedding.",
)
@click.option(
    "--input-range",
    metavar="LOW,HIGH",
    callback=_range,
    help="Value range of random inputs: integers in [LOW, HIGH), floats uniform (default: standard normal).",
)
@click.option("--checkpoint", metavar="PATH", help="Load these weights (a state dict; never arbitrary pickles).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for weights, inputs and gradients.")
@_fail_on_option("Exit with status 1 when a finding is at least this severe.")
@click.option("--try-fixes", is_flag=True, help="Re-run a copy of the model with each suggested fix and verify it.")
@click.option(
    "--threshold",
    "threshold_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="Change one threshold of the rules (repeatable), e.g. saturation_fraction_at_least=0.3; the names are the "
    "fields of actdiag.Thresholds. Wins over [tool.actdiag.thresholds] in pyproject.toml.",
)
@click.option("--layers", is_flag=True, help="Also print the per-layer depth profile, with bars.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def inspect_command(
    target: str,
    json_path: str | None,
    html_path: str | None,
    logdir: str | None,
    steps: int,
    optimizer: str,
    lr: float | None,
    device: str,
    input_shapes: tuple[tuple[int, ...], ...],
    input_dtypes: tuple[str, ...],
    input_range: tuple[float, float] | None,
    checkpoint: str | None,
    seed: int,
    fail_on: str,
    try_fixes: bool,
    threshold_options: tuple[str, ...],
    layers: bool,
    quiet: bool,
    debug: bool,
) -> None:
    if input_dtypes and not input_shapes:
        raise click.BadParameter("--input-dtype applies to --input-shape inputs; give --input-shape too")
    try:
        thresholds, threshold_notes = _thresholds(target, threshold_options)
    except ValueError as exc:
        _fail(_OptionError(str(exc)), debug)
    outputs = _Outputs(json_path, html_path, logdir)
    outputs.check()
    # With `--json -` the JSON document owns standard output; the summary moves to standard error.
    summary = sys.stderr if json_path == "-" else sys.stdout
    err = sys.stderr
    # With `--json -`, whatever the user's code prints goes to standard error, so standard output stays JSON.
    user_stdout = contextlib.redirect_stdout(sys.stderr) if json_path == "-" else contextlib.nullcontext()
    try:
        with user_stdout:
            report, notes, source = _run(
                target,
                load={
                    "input_shapes": input_shapes,
                    "input_dtypes": input_dtypes,
                    "input_range": input_range,
                    "checkpoint": checkpoint,
                    "device": device,
                    "seed": seed,
                },
                steps=steps,
                optimizer=optimizer,
                lr=lr,
                seed=seed,
                try_fixes=try_fixes,
                logdir=logdir,
                progress_stream=None if quiet else err,
                thresholds=thresholds,
            )
        outputs.write(report)
        notes = (*threshold_notes, *notes)
        _show(report, notes, source, summary=summary, json_stdout=json_path == "-", quiet=quiet, layers=layers)
    except KeyboardInterrupt:
        outputs.cleanup()
        click.echo("actdiag: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        outputs.cleanup()
        _fail(exc, debug)
    if not quiet:
        for p in outputs.written:
            click.echo(f"actdiag: wrote {p}", err=True)
        if logdir is not None:
            click.echo(f"actdiag: TensorBoard logs in {logdir} (tensorboard --logdir {logdir})", err=True)
    sys.exit(exit_status(report, fail_on))


def _show(
    report: Report,
    notes: Sequence[str],
    source: str,
    *,
    summary: Any,
    json_stdout: bool = False,
    quiet: bool = False,
    layers: bool = False,
) -> None:
    from actdiag.reports.console import format_summary, terminal_width, use_color

    if not quiet:
        for note in notes:
            click.echo(f"actdiag: note: {note}", err=True)
    color = use_color(summary)
    text = format_summary(
        report,
        width=terminal_width(summary),
        color=color,
        quiet=quiet,
        source=source,
        layers=layers,
        unicode=_unicode(summary),
    )
    click.echo(text, file=summary, color=color)
    if json_stdout:
        from actdiag.reports.json import dumps

        click.echo(dumps(report), nl=False)


def _unicode(stream: Any) -> bool:
    """Block characters for bars only where the stream's encoding can write them."""
    encoding = getattr(stream, "encoding", None) or ""
    return encoding.lower().replace("-", "").startswith("utf")


def exit_status(report: Report, fail_on: str) -> int:
    """1 when a finding is at least as severe as `fail_on` ("never" never fails), else 0."""
    return findings_status(report.findings, fail_on)


def findings_status(findings: Sequence[Finding], fail_on: str) -> int:
    """1 when one of `findings` is at least as severe as `fail_on` ("never" never fails), else 0."""
    if fail_on == "never":
        return EXIT_OK
    threshold = FAIL_ON.index(fail_on) - 1  # info=0, warning=1, error=2, as records.SEVERITY_RANK
    return EXIT_FINDINGS if any(f.rank >= threshold for f in findings) else EXIT_OK


class _OptionError(Exception):
    """A bad --threshold or pyproject.toml setting: exit 2, as a target that cannot be run (see `_fail`)."""


def _thresholds(target: str, options: Sequence[str]) -> tuple[Any, tuple[str, ...]]:
    """The thresholds for this run, and a note saying where non-default values came from. Defaults, then the
    `[tool.actdiag.thresholds]` table of the pyproject.toml nearest to the target (a file's folder and the folders
    above it; for a package.module target, the current directory and above), then --threshold options."""
    from actdiag.rules.thresholds import (
        find_pyproject,
        make_thresholds,
        parse_threshold_option,
        pyproject_thresholds,
    )

    spec = target.strip().rpartition(":")[0] if _has_name(target) else target.strip()
    looks_like_file = spec.endswith(".py") or "/" in spec or os.sep in spec or Path(spec).is_file()
    start = Path(spec).parent if looks_like_file else Path.cwd()
    notes: list[str] = []
    thresholds = None
    pyproject = find_pyproject(start)
    if pyproject is not None:
        table = pyproject_thresholds(pyproject)
        if table:
            thresholds = make_thresholds(table, origin=str(pyproject))
            listed = ", ".join(f"{k}={v}" for k, v in table.items())
            notes.append(f"thresholds from {pyproject}: {listed}")
    given = dict(parse_threshold_option(text) for text in options)
    if given:
        thresholds = make_thresholds(given, base=thresholds, origin="--threshold")
    return thresholds, tuple(notes)


_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _has_name(target: str) -> bool:
    """Whether TARGET ends in :NAME (as actdiag.loading.parse_target reads it; that module imports torch)."""
    head, sep, tail = target.strip().rpartition(":")
    return bool(sep and head and _DOTTED_NAME.fullmatch(tail))


def _run(
    target: str,
    *,
    load: dict[str, Any],
    steps: int,
    optimizer: str,
    lr: float | None,
    seed: int,
    try_fixes: bool,
    logdir: str | None,
    progress_stream: Any,
    thresholds: Any = None,
) -> tuple[Report, tuple[str, ...], str]:
    from actdiag.loading import make_optimizer, open_target, run_inspect
    from actdiag.reports.console import ProgressBar

    bar = ProgressBar(progress_stream) if progress_stream is not None and steps > 1 else None
    try:
        with open_target(target, **load) as t:
            report = run_inspect(
                t,
                steps=steps,
                optimizer=make_optimizer(t.model, optimizer, lr),
                try_fixes=try_fixes,
                seed=seed,
                logdir=logdir,
                progress=bar,
                thresholds=thresholds,
            )
            return report, t.notes, f"{t.spec.where}: {t.found_as}"
    finally:
        if bar is not None:
            bar.close()


def _fail(exc: Exception, debug: bool) -> NoReturn:
    from actdiag.errors import ActdiagError

    if debug:
        click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    if isinstance(exc, (ActdiagError, _OptionError)):
        click.echo(f"actdiag: error: {exc}", err=True)
        sys.exit(EXIT_TARGET)
    click.echo(f"actdiag: internal error: {type(exc).__name__}: {exc}", err=True)
    click.echo(REPORT_BUG, err=True)
    sys.exit(EXIT_INTERNAL)


# ----------------------------------------------------------------------------------------------- report
REPORT_HELP = """Show a saved run again: its summary on the terminal, and with --html its HTML report.

RUN.json is a report written by `actdiag inspect --json`, `report.save_json()` or `monitor.save_json()`. The HTML
shows what the JSON holds (a watch's per-step histograms are not in it).

\b
Exit status: 0 shown; 2 RUN.json cannot be read, is not an actdiag report or is of another schema version, or the
HTML cannot be written.

\b
Examples:
  actdiag report run.json --html run.html
  actdiag report run.json --layers
"""


@cli.command("report", help=REPORT_HELP, no_args_is_help=True)
@click.argument("run_json", metavar="RUN.json")
@click.option("--html", "html_path", metavar="PATH", help="Write the HTML report here.")
@click.option("--layers", is_flag=True, help="Also print the per-layer depth profile, with bars.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def report_command(run_json: str, html_path: str | None, layers: bool, quiet: bool, debug: bool) -> None:
    _check_output_path(html_path, "--html")
    try:
        from actdiag.reports.json import load_json

        report = load_json(run_json)
        if html_path is not None:
            report.save_html(html_path)
        _show(report, (), run_json, summary=sys.stdout, quiet=quiet, layers=layers)
    except Exception as exc:
        _fail(exc, debug)
    if html_path is not None and not quiet:
        click.echo(f"actdiag: wrote {html_path}", err=True)
    sys.exit(EXIT_OK)


# ----------------------------------------------------------------------------------------------- diff
DIFF_HELP = """Compare two saved runs of one model: per-layer changes and the findings that appeared or went away.

BEFORE.json and AFTER.json are reports written by `actdiag inspect --json` or `save_json()`. Layers are matched by
name; a layer only one run has is listed. A finding appeared when AFTER has it and BEFORE does not, or has it less
severe; it went away when only BEFORE has it. A '*' marks a layer whose numbers moved notably (a magnitude by 2x or
more, a share by 10 points or more).

\b
Exit status:
  0  compared; no finding at or above --fail-on appeared
  1  a finding at or above --fail-on appeared (findings already in BEFORE do not count)
  2  a file cannot be read, is not an actdiag report or is of another schema version, or the two are runs of
     different models (the message names what differs)

\b
Examples:
  actdiag diff before.json after.json
  actdiag diff main.json branch.json --fail-on warning
"""


@cli.command("diff", help=DIFF_HELP, no_args_is_help=True)
@click.argument("before_json", metavar="BEFORE.json")
@click.argument("after_json", metavar="AFTER.json")
@_fail_on_option("Exit with status 1 when a finding at least this severe appeared.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def diff_command(before_json: str, after_json: str, fail_on: str, quiet: bool, debug: bool) -> None:
    try:
        from actdiag.reports.console import diff_verdict, format_diff, terminal_width, use_color
        from actdiag.reports.diff import compare
        from actdiag.reports.json import load_json

        names = (before_json, after_json)
        diff = compare(load_json(before_json), load_json(after_json), names=names)
        color = use_color(sys.stdout)
        if quiet:
            text = diff_verdict(diff, names=names, color=color)
        else:
            text = format_diff(diff, names=names, width=terminal_width(sys.stdout), color=color)
        click.echo(text, color=color)
    except Exception as exc:
        _fail(exc, debug)
    sys.exit(findings_status(diff.appeared, fail_on))


def main() -> None:
    cli(prog_name="actdiag")
