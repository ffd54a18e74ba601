"""What both framework callbacks share: their settings and results, the missing-package error and the
end-of-training summary."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actdiag.monitor import DEFAULT_EVERY, Monitor, check_every
from actdiag.records import Finding, measured_stats


def missing_extra(extra: str, framework: str, package: str) -> ImportError:
    """The error for using an integration without its framework, with the command that installs it."""
    return ImportError(
        f"actdiag.integrations.{extra} needs {framework} (the {package!r} package), which is not installed. "
        f'Install it with: pip install "actdiag[{extra}]"'
    )


class CallbackBase:
    """The settings and results of a framework callback: `.monitor` (the Monitor, closed once training ends),
    `.logdir` (where TensorBoard files went) and `.findings` (ranked). Framework base classes come after it."""

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        logdir: str | os.PathLike[str] | None = None,
        *,
        tensorboard: bool = True,
        verbose: bool = True,
        **watch_kwargs: Any,
    ) -> None:
        self.every = check_every(every)
        self.tensorboard = tensorboard
        self.verbose = verbose
        self._own_logdir = logdir
        self._watch_kwargs = watch_kwargs
        self.monitor: Monitor | None = None
        self.logdir: Path | None = None
        self.findings: tuple[Finding, ...] = ()
        self._running = False


def summary(monitor: Monitor, findings: Sequence[Finding], logdir: Path | None) -> str:
    """A few lines for the end of training: what was recorded, where it went, the findings in rank order."""
    head = f"actdiag: recorded {monitor.recorded_steps} of {monitor.steps} steps (every {monitor.every})"
    rec = monitor.latest
    if rec is not None and any(st.estimated for st in measured_stats(rec.layers, rec.params)):
        head += "; large tensors' std, zeros and histograms estimated from a sample (accuracy='exact' for exact ones)"
    if logdir is not None:
        head += f"; TensorBoard: {logdir}"
    if not findings:
        return head + "\nactdiag: no findings"
    lines = [head, f"actdiag: {len(findings)} finding(s), most severe first:"]
    for f in findings:
        fixes = ", ".join(fix.code for fix in f.fixes)
        where = f.layer if f.layer is not None else "(model)"
        lines.append(f"  {f.severity:<7} {where}: {f.code}: {f.message}" + (f" [fix: {fixes}]" if fixes else ""))
    return "\n".join(lines)
