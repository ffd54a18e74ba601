"""DistributedDataParallel: statistics merged across 2 gloo ranks equal one process over the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from actdiag.hooks.layout import merge_vectors, rebin
from actdiag.hooks.stats import decode_tensor_stats, tensor_stats

from . import rel_ddp_worker as worker
from .rel_reference import np_stats

WORKER = Path(worker.__file__)
ROOT = WORKER.parents[2]  # the repository root, so that the workers import this checkout of actdiag
WORLD = 2


# ---------------------------------------------------------------------------------------------- merge arithmetic
def _split_merge(parts: list[np.ndarray], bins: int = 16) -> tuple[Any, np.ndarray]:
    rows, extras = [], []
    for part in parts:
        vec, meta = tensor_stats(torch.from_numpy(part), bins=bins, path="device")
        rows.append(vec.numpy())
        extras.append((meta.numel, meta.sample_n, meta.estimated))
    merged, meta = merge_vectors(np.stack(rows), np.array(extras, dtype=np.float64), bins)
    return decode_tensor_stats(merged, meta), merged


@pytest.mark.parametrize("cuts", [(0, 5, 40), (17, 17, 40), (1, 2, 3), (30, 39, 40)])
def test_rel_merge_matches_float64_reference(cuts: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(cuts))
    x = rng.normal(3.0, 2.0, size=40)
    x[[3, 11]] = 0.0
    x[7] = np.nan
    x[20] = np.inf
    parts = np.split(x, list(cuts))  # includes empty and all-non-finite parts for some cuts
    merged, _ = _split_merge(parts)
    ref = np_stats(x, bins=16)
    assert merged.numel == ref["numel"] and merged.count == ref["count"]
    assert merged.zero_count == ref["zero_count"]
    assert merged.min == ref["min"] and merged.max == ref["max"]
    assert merged.mean == pytest.approx(ref["mean"], rel=1e-12)
    assert merged.m2 == pytest.approx(ref["m2"], rel=1e-12)
    np.testing.assert_array_equal(merged.exponents.counts, ref["exponents"])
    assert merged.histogram.edges == pytest.approx(tuple(np.linspace(ref["min"], ref["max"], 17)), rel=0, abs=0)
    assert merged.histogram.total == ref["count"]


def test_rel_merged_estimates_stay_flagged() -> None:
    # One rank's big slice is estimated (exact=False on the CPU), the other's small slice exact: the merge says so.
    big, small = torch.randn(20_000), torch.randn(100)
    rows, extras = [], []
    for part in (big, small):
        vec, meta = tensor_stats(part, bins=16, sample_cap=1000, exact=False)
        rows.append(vec.numpy())
        extras.append((meta.numel, meta.sample_n, meta.estimated))
    assert [e[2] for e in extras] == [True, False]
    merged, meta = merge_vectors(np.stack(rows), np.array(extras, dtype=np.float64), 16)
    s = decode_tensor_stats(merged, meta)
    assert s.estimated and s.numel == 20_100 and s.count == 20_100
    both = torch.cat([big, small]).double()
    assert s.mean == pytest.approx(both.mean().item(), rel=1e-5, abs=1e-6)


def test_rel_rebin_identical_ranges_is_exact_and_constant_ranks_land_in_their_bin() -> None:
    counts = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 0.0, 0.0, 1.0]])
    same = rebin(np.array([0.0, 0.0]), np.array([4.0, 4.0]), counts, np.array([True, True]))
    np.testing.assert_array_equal(same, counts.sum(axis=0))
    # rank 1 is constant at 3.5 (its 5 values sit in its bin 0); on the common edges 0..4 that is bin 3
    mixed = rebin(
        np.array([0.0, 3.5]), np.array([4.0, 3.5]), np.array([[1.0, 2, 3, 4], [5.0, 0, 0, 0]]), np.ones(2, bool)
    )
    np.testing.assert_array_equal(mixed, [1, 2, 3, 9])


def test_rel_rebin_keeps_totals_and_moves_counts_at_most_one_bin() -> None:
    rng = np.random.default_rng(5)
    bins = 32
    a, b = rng.normal(0, 1, 1000), rng.normal(1.5, 0.5, 700)
    both = np.concatenate([a, b])
    lo, hi = both.min(), both.max()
    rows = [np_stats(a, bins)["lin"], np_stats(b, bins)["lin"]]
    merged = rebin(np.array([a.min(), b.min()]), np.array([a.max(), b.max()]), np.stack(rows), np.ones(2, bool))
    true = np_stats(both, bins)["lin"]
    assert merged.sum() == true.sum() == both.size
    assert np.all(merged == np.round(merged))
    # Each rank's source bin is at most one common bin wide, so the cumulative counts differ by at most the
    # counts of the source bins straddling an edge (<= each rank's largest bin), plus rounding.
    bound = rows[0].max() + rows[1].max() + 2
    assert np.abs(np.cumsum(merged) - np.cumsum(true)).max() <= bound
    assert lo < hi


# ------------------------------------------------------------------------------------------------ 2 gloo ranks
def _reference() -> dict[str, Any]:
    """The worker's run in one process over the whole batch, observed with plain hooks (no actdiag)."""
    model = worker.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = {m: n for n, m in model.named_modules() if n}
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    ever: dict[str, np.ndarray] = {}

    def fwd(module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        name = names[module]
        acts[name] = out.detach().clone()
        out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))

    for m in names:
        m.register_forward_hook(fwd)
    weights: dict[str, torch.Tensor] = {}
    for step in range(worker.STEPS):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        x, y = worker.global_batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        relu = acts["1"].numpy()
        ever["1"] = ever.get("1", np.zeros(relu.shape[1], bool)) | (relu > 0).any(axis=0)
        pgrads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return {"acts": acts, "grads": grads, "ever": ever, "weights": weights, "pgrads": pgrads}


def _check_stats(got: dict[str, Any], x: torch.Tensor, rel: float) -> None:
    ref = np_stats(x.numpy())
    assert got["numel"] == ref["numel"] and got["count"] == ref["count"]
    assert got["zero_count"] == ref["zero_count"]
    assert got["min"] == pytest.approx(ref["min"], rel=rel, abs=1e-12)
    assert got["max"] == pytest.approx(ref["max"], rel=rel, abs=1e-12)
    assert got["mean"] == pytest.approx(ref["mean"], rel=rel, abs=1e-9)
    assert got["m2"] == pytest.approx(ref["m2"], rel=rel, abs=1e-12)
    if rel == 0:
        np.testing.assert_array_equal(got["exponents"], ref["exponents"])
    assert sum(got["counts"]) == ref["count"]
    if "lin" in ref:
        edges = np.linspace(ref["min"], ref["max"], len(got["counts"]) + 1)
        np.testing.assert_allclose(got["edges"], edges, rtol=rel, atol=rel * (ref["max"] - ref["min"]))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(WORLD), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers did not finish in 120 s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)] + [
        json.loads((out / f"rank{r}_fsdp.json").read_text()) for r in range(WORLD)
    ]


def test_rel_ddp_ranks_agree_and_only_rank0_writes(ddp_run: tuple[Path, list[dict[str, Any]]]) -> None:
    out, docs = ddp_run
    assert docs[0] == docs[1]  # every rank holds the same merged statistics (and findings)
    assert docs[2] == docs[3]
    for mode in ("ddp", "fsdp"):
        assert (out / f"report_{mode}_rank0.json").exists()
        assert not (out / f"report_{mode}_rank1.json").exists()


def test_rel_ddp_one_collective_per_recorded_step(ddp_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = ddp_run
    # The first recorded step agrees on the payload size (one extra small gather); after that, one per step.
    assert docs[0]["collectives_per_step"] == [2] + [1] * (worker.STEPS - 1)
    assert docs[0]["merger_collectives"] == worker.STEPS + 1


def _check_layers(doc: dict[str, Any], ref: dict[str, Any]) -> None:
    assert doc["step"] == worker.STEPS - 1
    assert set(doc["layers"]) == {"0", "1", "2", "3", "4", "5"}
    for label, layer in doc["layers"].items():
        # Activations are per-sample computations: the merge is exact up to float32 accumulation in the kernel.
        _check_stats(layer["activation"], ref["acts"][label], rel=1e-5)
        _check_stats(layer["gradient"], ref["grads"][label], rel=1e-5)
    act1 = ref["acts"]["1"].numpy()
    per_unit = (act1 > 0).sum(axis=0)
    relu = doc["layers"]["1"]
    assert relu["units"] == 16
    assert relu["dead_fraction"] == pytest.approx((per_unit == 0).mean())
    assert relu["dead_fraction"] >= 4 / 16  # the four units with bias -100
    assert relu["rare_fraction"] == pytest.approx((per_unit < 0.01 * act1.shape[0]).mean())
    assert relu["never_active_fraction"] == pytest.approx((~ref["ever"]["1"]).mean())
    tanh = ref["acts"]["3"].numpy()
    assert doc["layers"]["3"]["saturation"] == pytest.approx((np.abs(tanh) >= 0.99).mean())
    assert doc["layers"]["3"]["saturation"] > 0


def test_rel_ddp_merged_equals_single_process_over_whole_batch(ddp_run: tuple[Path, list[dict[str, Any]]]) -> None:
    doc = ddp_run[1][0]
    ref = _reference()
    _check_layers(doc, ref)
    assert set(doc["params"]) == set(ref["weights"])
    for name, p in doc["params"].items():
        # Parameters are replicated by DDP: exact weights; gradients are DDP's all-reduced average.
        _check_stats(p["weight"], ref["weights"][name], rel=1e-6)
        _check_stats(p["grad"], ref["pgrads"][name], rel=1e-4)
    assert not doc["warnings"]


def test_rel_fsdp_merges_activations_and_says_parameters_are_not_recorded(
    ddp_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    doc = ddp_run[1][2]
    _check_layers(doc, _reference())
    assert doc["params"] == {}
    assert any("sharded (FSDP)" in w for w in doc["warnings"])
