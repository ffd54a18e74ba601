"""One rank of the DDP merge test (tests/reliability/test_rel_ddp.py): `python rel_ddp_worker.py RANK WORLD DIR`.

Each rank trains a DistributedDataParallel copy of `build_model()` on its slice of `global_batch(step)` under
`actdiag.watch(every=1)` and dumps what the monitor recorded (exact float reprs) to DIR/rank{RANK}.json; then the
same with FSDP2 (`fully_shard`) to DIR/rank{RANK}_fsdp.json.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STEPS = 3
GLOBAL_BATCH = 16
FEATURES = 8
COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "gather",
    "reduce",
    "scatter",
    "reduce_scatter_tensor",
    "barrier",
)


def build_model() -> nn.Module:
    """An MLP with four dead ReLU units (bias -100) and a saturating tanh layer (weights x5), ending in an
    nn.Identity (its output is the last Linear's, measured once and merged once)."""
    torch.manual_seed(1234)
    model = nn.Sequential(
        nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4), nn.Identity()
    )
    with torch.no_grad():
        model[0].bias[:4] = -100.0
        model[2].weight.mul_(5.0)
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, FEATURES, generator=g)
    y = torch.randn(GLOBAL_BATCH, 4, generator=g)
    return x, y


def stats_dict(s: Any) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "numel": s.numel,
        "count": s.count,
        "mean": s.mean,
        "m2": s.m2,
        "min": s.min,
        "max": s.max,
        "zero_count": s.zero_count,
        "edges": list(s.histogram.edges),
        "counts": list(s.histogram.counts),
        "exponents": list(s.exponents.counts),
    }


def main() -> None:
    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world)
    # Count every Python-level collective issued while actdiag reads a step back (inside monitor.step()).
    calls = {"n": 0}
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def counted(*args: Any, _fn: Any = fn, **kwargs: Any) -> Any:
            calls["n"] += 1
            return _fn(*args, **kwargs)

        setattr(dist, name, counted)

    (out / f"rank{rank}.json").write_text(json.dumps(train(rank, world, out, "ddp", calls), allow_nan=True))
    (out / f"rank{rank}_fsdp.json").write_text(json.dumps(train(rank, world, out, "fsdp", calls), allow_nan=True))
    dist.destroy_process_group()
    # Skip the interpreter's teardown. After destroy_process_group() gloo's run-loop threads are still alive here,
    # and on a loaded 2-core machine the C++ teardown then sometimes aborts ("terminate called without an active
    # exception"), with or without actdiag attached (seen 1 run in 30 to 60). The results are already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train(rank: int, world: int, out: Path, mode: str, calls: dict[str, int]) -> dict[str, Any]:
    """Train under DDP or FSDP2 (fully_shard) and return what the monitor recorded."""
    import actdiag

    model = build_model()
    if mode == "ddp":
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        wrapped = fully_shard(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    per_rank = GLOBAL_BATCH // world
    per_step: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = actdiag.watch(wrapped, every=1, report_json=out / f"report_{mode}_rank{rank}.json")
    with monitor:
        for step in range(STEPS):
            x, y = global_batch(step)
            xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
            loss = nn.functional.mse_loss(wrapped(xs), ys)  # a batch mean, the usual data-parallel idiom
            loss.backward()
            opt.step()
            opt.zero_grad()
            before = calls["n"]
            monitor.step()
            per_step.append(calls["n"] - before)
    rec = monitor.latest
    assert rec is not None
    return {
        "warnings": [str(w.message) for w in caught],
        "step": rec.step,
        "collectives_per_step": per_step,
        "merger_collectives": monitor.recorder.merger.collectives if monitor.recorder.merger else None,
        "layers": {
            layer.label: {
                "name": layer.name,
                "activation": stats_dict(layer.activation),
                "gradient": stats_dict(layer.gradient),
                "saturation": layer.saturation,
                "units": layer.units,
                "dead_fraction": layer.dead_fraction,
                "rare_fraction": layer.rare_fraction,
                "never_active_fraction": layer.never_active_fraction,
            }
            for layer in rec.layers
        },
        "params": {
            p.name: {"weight": stats_dict(p.weight), "grad": stats_dict(p.grad), "update_ratio": p.update_ratio}
            for p in rec.params
        },
        "findings": [f.code for f in monitor.findings],
    }


if __name__ == "__main__":
    main()
