"""Update ratios: ||w_after - w_before|| / ||w_before|| over the optimizer step of a recorded training step.

The weight is copied when its gradient is ready (the optimizer has not run yet) and compared with itself at the end
of the step. The copy holds every element when statistics are exact, or a large weight's fixed sample (the
histograms') when it may be estimated: a full copy of every weight on every recorded step would double the
parameters' memory and cost two extra passes over them. Three ways, as for the statistics: numpy on the host (one
batch for all CPU weights), rows of one buffer on the device path (`UpdateRows`), and device ops per weight for the
rest (float64 weights, weights on a second device).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from actdiag.hooks.device import RowBatch, RowStore, fill_row
from actdiag.hooks.host import SizeRows, copy_rows
from actdiag.hooks.sampling import _BATCH_DTYPES, _SAMPLES, numpy_view


class UpdateRatios:
    """The weight copies of one recorded step and, in `finish()`, the [||w_now - w_before||, ||w_before||] norms
    of every weight still of its size, kind and device, as float64 2-vectors keyed by parameter name."""

    def __init__(self, sample_cap: int) -> None:
        self.sample_cap = sample_cap
        self._device_rows = UpdateRows(sample_cap)  # the device path's copies, compared in one set of ops
        self._tensors: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}  # (sample index, copy)
        # The host path's copies: (numel, sample index, rows, row), rows per (copy length, dtype) kept across steps
        self._arrays: dict[str, tuple[int, np.ndarray | None, SizeRows, int]] = {}
        self._rows: dict[tuple[int, np.dtype[Any]], SizeRows] = {}
        self._scratch: dict[str, np.ndarray] = {}  # _host_ratios' chunk buffer

    def snapshot(
        self, pname: str, flat: torch.Tensor, *, host: bool, sampled: bool, copy: tuple[SizeRows, int] | None = None
    ) -> None:
        """Copy weight `flat` (1-D, before the optimizer step): its sample when `sampled`, all of it otherwise;
        `host`: the host path (numpy) may take it. `copy`: a row that holds all of it already, in its own dtype
        and as it is now (the host batch's copy for its statistics), kept instead of a copy of its own."""
        n = flat.numel()
        if copy is not None and host and not sampled and copy[0].rows.shape[1] == n:
            self._arrays[pname] = (n, None, *copy)
            return
        a = numpy_view(flat) if host and n else None
        if a is not None:  # on the CPU: numpy, no ATen call (see _host_ratios)
            idx_np = _SAMPLES.get_numpy(n, self.sample_cap) if sampled else None
            m = n if idx_np is None else idx_np.size
            rows = self._rows.get((m, a.dtype))
            if rows is None:
                rows = self._rows[(m, a.dtype)] = SizeRows(m, a.dtype)
            k, row = rows.next_row()
            if idx_np is None:
                np.copyto(row, a)
            else:
                np.take(a, idx_np, out=row)
            self._arrays[pname] = (n, idx_np, rows, k)
            return
        if (sampled or n <= self.sample_cap) and self._device_rows.take(pname, flat):
            return  # the device path: compared in one batch in finish()
        if sampled:
            idx = _SAMPLES.get(n, self.sample_cap, flat.device)
            self._tensors[pname] = (idx, flat.index_select(0, idx))
        else:
            self._tensors[pname] = (None, flat.clone())

    def keep_rows(self, pnames: list[str], rows: SizeRows, start: int) -> None:
        """`snapshot()` of weights copied whole, before the optimizer step, into consecutive rows of `rows` from
        `start` (`HostBatch.take_many`, in its float32): those copies are kept as theirs."""
        n = rows.rows.shape[1]
        for k, pname in enumerate(pnames, start):
            self._arrays[pname] = (n, None, rows, k)

    def finish(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | np.ndarray]:
        """The norms of every weight copied this step (see the class docstring), numpy for the host path's; the
        copies are dropped."""
        out: dict[str, torch.Tensor | np.ndarray] = {}
        try:
            if self._tensors:
                out.update(_tensor_ratios(self._tensors, params))
            if self._arrays:
                out.update(_host_ratios(self._arrays, params, self._scratch))
            if len(self._device_rows):
                out.update(self._device_rows.ratios(params))
        finally:
            self.clear()
        return out

    def clear(self) -> None:
        self._tensors = {}
        self._arrays = {}
        for rows in self._rows.values():
            rows.used = 0
        self._device_rows.clear()

    def release(self) -> None:
        """`clear()`, and give the host and device rows back (when recording stops)."""
        self.clear()
        self._rows = {}
        self._scratch = {}
        self._device_rows.release()


# Rows of the host path's update ratios are compared in chunks of about this many elements: the float64 scratch
# stays in cache and is kept across steps.
_CHUNK = 1 << 16


def _host_ratios(
    snaps: Mapping[str, tuple[int, np.ndarray | None, SizeRows, int]],
    params: Mapping[str, torch.Tensor],
    scratch: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The norms of every CPU parameter with a numpy copy, a batch per copy size: the same elements of the updated
    weight are copied into rows beside the copies, then, a chunk of rows at a time, the float64 difference (exact)
    and two row-wise sums of squares for all of them (two einsum calls and a tensor per parameter cost more than
    their arithmetic at a few thousand elements). `scratch` holds the chunk buffers from one step to the next."""
    groups: dict[int, tuple[SizeRows, list[tuple[str, torch.Tensor, np.ndarray | None, int]]]] = {}  # p not detached
    dtypes: dict[int, torch.dtype] = {}
    for pname, (n, idx, rows, k) in snaps.items():
        p = params[pname]
        dtype = dtypes.get(id(rows))
        if dtype is None:
            dtype = dtypes[id(rows)] = torch.from_numpy(rows.rows[:0, :0]).dtype
        if not p.is_cpu or p.dtype != dtype or p.numel() != n:
            continue  # replaced by a tensor of another size or dtype, or moved off the CPU: no ratio
        groups.setdefault(id(rows), (rows, []))[1].append((pname, p, idx, k))
    out: dict[str, np.ndarray] = {}
    for rows, items in groups.values():
        m = rows.rows.shape[1]
        per = max(1, _CHUNK // m)
        if scratch.get("d") is None or scratch["d"].size < per * m:
            scratch["d"] = np.empty(per * m)
        norms = np.empty((len(items), 2))
        for lo in range(0, len(items), per):
            chunk = items[lo : lo + per]
            c = len(chunk)
            d = scratch["d"][: c * m].reshape(c, m)
            ks = [k for _, _, _, k in chunk]
            # Consecutive rows (a size's weights copied together, `keep_rows`) are read in place, others gathered.
            before = rows.rows[ks[0] : ks[0] + c] if ks == list(range(ks[0], ks[0] + c)) else rows.rows[ks]
            if c == 1:  # a large weight: converted straight into the float64 row, no copy in its own dtype first
                _, w, idx, _ = chunk[0]
                w = w.detach().reshape(-1)
                torch.from_numpy(d[0]).copy_(w if idx is None else w[torch.from_numpy(idx)])
                d -= before  # float64: exact
            else:  # small weights: the chunk's in one copy, then one float64 difference (exact)
                name = "now-" + rows.rows.dtype.name
                now = scratch.get(name)
                if now is None or now.size < per * m:
                    now = scratch[name] = np.empty(per * m, dtype=rows.rows.dtype)
                cur = now[: c * m].reshape(c, m)
                _stack_rows([(w, idx) for _, w, idx, _ in chunk], torch.from_numpy(cur))
                np.subtract(cur, before, out=d, dtype=np.float64)
            norms[lo : lo + c, 0] = np.einsum("ij,ij->i", d, d)
            norms[lo : lo + c, 1] = np.einsum("ij,ij->i", before, before, dtype=np.float64)
        np.sqrt(norms, out=norms)
        out.update(zip([pname for pname, _, _, _ in items], norms, strict=True))
    return out


def _stack_rows(weights: list[tuple[torch.Tensor, np.ndarray | None]], out: torch.Tensor) -> None:
    """Row i of `out` [K, m]: weight i flattened (`idx` None) or its elements at `idx` (`host.copy_rows`)."""
    copy_rows([w if idx is None else w.detach().reshape(-1)[torch.from_numpy(idx)] for w, idx in weights], out)


def _tensor_ratios(
    snaps: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]], params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Device ops, nothing read back: the norms of the device path's weights that `UpdateRows` does not take (large
    and exact, float64, on a second device), with a fixed number of ops per (device, dtype) group whatever the
    number of weights: one `_foreach_sub`, one `_foreach_norm` of the differences and the copies together (each a
    multi-tensor kernel on a GPU; a weight per op was five launches), one stack. Half-precision weights are normed
    in float32, as the rows are; float64 ones in float64. A weight replaced by one of another size, dtype or device
    gets no ratio."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for pname, (idx, p0) in snaps.items():
        p = params.get(pname)
        if p is None or p.dtype != p0.dtype or p.device != p0.device:
            continue
        cur = p.detach().reshape(-1)
        if idx is not None:
            if idx.device != cur.device:
                continue
            cur = cur.index_select(0, idx)
        if cur.shape != p0.shape:
            continue
        groups.setdefault((p0.device, p0.dtype), []).append((pname, cur, p0))
    out: dict[str, torch.Tensor] = {}
    for (_, dtype), items in groups.items():
        wide = None if dtype in (torch.float32, torch.float64) else torch.float32
        before = [p0 for _, _, p0 in items]
        deltas = torch._foreach_sub([cur for _, cur, _ in items], before)
        both = torch.stack(torch._foreach_norm([*deltas, *before], 2, wide)).view(2, len(items)).to(torch.float64)
        out.update((pname, both[:, j]) for j, (pname, _, _) in enumerate(items))
    return out


class UpdateRows(RowBatch):
    """The device path's (CUDA's) weight copies for the update ratios, as rows of one float32 buffer (zero past a
    weight's elements; each row's first half takes the weight after the update, its second the copy before it),
    compared with the updated weights in one set of ops for all of them in `ratios()` (each op a kernel launch on a
    GPU). float64 weights, and weights on another device than the first one taken, are left to `_tensor_ratios`."""

    def __init__(self, cap: int) -> None:
        # kept: name -> (row, numel, sample index); a row: the weight after the update (then the difference), then
        # its copy before it (one buffer: one reset, and both norms of every row by one reduction, in that order).
        super().__init__(RowStore((2 * cap, torch.float32, 0.0)))
        self.cap = cap

    def take(self, pname: str, flat: torch.Tensor) -> bool:
        """Keep the sample of weight `flat` (1-D, before the optimizer step); False if it does not qualify."""
        if flat.dtype not in _BATCH_DTYPES or self._store.device not in (None, flat.device):
            return False
        n = flat.numel()
        idx = _SAMPLES.get(n, self.cap, flat.device) if n > self.cap else None
        k = self._store.next_row(flat.device)
        fill_row(self._store.buffers[0][k, self.cap :], flat, idx)
        self.kept[pname] = (k, n, idx)
        return True

    def ratios(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """[||w_now - w_before||, ||w_before||] over each kept weight's copy, as float64 2-vectors on the device,
        for every kept weight still of its size, dtype class and device; the rows are then cleared."""
        (both,) = self._store.in_use()
        pairs = both.view(both.shape[0], 2, self.cap)
        now, before = pairs[:, 0], pairs[:, 1]
        rows: dict[str, int] = {}
        whole: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # float32 weights copied whole: one copy
        for pname, (k, n, idx) in self.kept.items():
            p = params.get(pname)
            if p is None or p.numel() != n or p.dtype not in _BATCH_DTYPES or p.device != before.device:
                continue  # replaced by a tensor of another size or kind, or moved: no ratio
            flat = p.detach().reshape(-1)
            if idx is None and flat.dtype == torch.float32:
                whole[0].append(now[k, :n])
                whole[1].append(flat)
            else:
                fill_row(now[k], flat, idx)
            rows[pname] = k
        if whole[0]:
            torch._foreach_copy_(*whole)  # one multi-tensor kernel on a GPU
        now.sub_(before)  # the difference in place: both norms of every row by one reduction
        norms = torch.linalg.vector_norm(pairs, dim=2).to(torch.float64)
        self.clear()
        return {pname: norms[k] for pname, k in rows.items()}


LOW_PRECISION = (torch.float16, torch.bfloat16)


class LostUpdateCounts:
    """For float16/bfloat16 parameters: how many elements with a non-zero gradient the optimizer step left exactly
    unchanged (their update was below half an ulp and rounded away), as float64 [unchanged, non-zero] 2-vectors.

    The copy before the step is the weight in its own dtype with NaN where the gradient is zero, so after the step
    one comparison counts only the elements that had a gradient (NaN equals nothing). It is taken again at every
    gradient accumulation (the weight has not moved yet; the gradient has), over the elements the update ratio
    reads: all of them, or its fixed sample when that is estimated. Device ops only; the counts are read back with
    the step's other vectors."""

    def __init__(self, sample_cap: int) -> None:
        self.sample_cap = sample_cap
        # name -> (numel, sample index, copy, elements with a non-zero gradient)
        self._snaps: dict[str, tuple[int, torch.Tensor | None, torch.Tensor, torch.Tensor]] = {}

    def snapshot(self, pname: str, p: torch.Tensor, *, sampled: bool) -> None:
        """Copy weight `p` before the optimizer step, against its current `.grad`; nothing for other dtypes."""
        grad = p.grad
        if p.dtype not in LOW_PRECISION or grad is None or grad.layout != torch.strided or grad.shape != p.shape:
            return
        flat = p.detach().reshape(-1)
        g = grad.detach().reshape(-1)
        idx = _SAMPLES.get(flat.numel(), self.sample_cap, flat.device) if sampled else None
        if idx is not None:
            flat, g = flat.index_select(0, idx), g.index_select(0, idx)
        moving = g != 0
        before = torch.where(moving, flat, flat.new_full((), float("nan")))
        self._snaps[pname] = (p.numel(), idx, before, moving.sum())

    def finish(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The counts of every weight copied this step and still of its size, dtype and device; copies dropped."""
        out: dict[str, torch.Tensor] = {}
        snaps, self._snaps = self._snaps, {}
        for pname, (n, idx, before, nonzero) in snaps.items():
            p = params.get(pname)
            if p is None or p.numel() != n or p.dtype != before.dtype or p.device != before.device:
                continue  # replaced by a tensor of another size or dtype, or moved: no count
            cur = p.detach().reshape(-1)
            if idx is not None:
                cur = cur.index_select(0, idx)
            out[pname] = torch.stack([(cur == before).sum(), nonzero]).to(torch.float64)
        return out

    def clear(self) -> None:
        self._snaps = {}
