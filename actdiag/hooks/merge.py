"""Merging one recorded step's statistics across the ranks of `torch.distributed` (DistributedDataParallel).

Under data parallelism every rank sees its own slice of the batch, so the statistics a single process would have
computed over the whole batch are a merge of the ranks' statistics. Everything the recorder keeps merges exactly:

* a tensor's statistics vector: slot by slot, by the rule written beside each slot in `layout.STATS` (sums for
  counts, min/max over the ranks that saw a finite value, Chan, Golub & LeVeque's pairwise update for mean and
  m2), exponent histograms summed (`layout.merge_vectors`); the non-finite count follows through numel;
* saturation counts: sums;
* dead units: per-unit counts of positive outputs are summed (a unit is dead when the sum is 0, rare when it is
  under 1% of all samples) and the "ever active" masks are OR-ed;
* linear histograms are the one thing that cannot merge exactly: each rank bins between its own min and max, so
  the ranks' edges differ. They are re-binned onto the common edges (`layout.rebin`).

Parameters under DDP are replicated (and their gradients all-reduced), so parameter statistics are not merged:
every rank records the same numbers and rank 0's row is used.

One collective per recorded step. Each rank packs `[length, layout checksum, payload padded to C]` into one float64
vector and the ranks `all_gather` it. C is the payload capacity the ranks agreed on; it starts at 0, so the first
recorded step (and any step whose payload is longer than every earlier one) sees a header with a longer length, and
all ranks, reading the same gathered headers, agree on the new capacity and gather once more. A gather of
mismatched sizes aborts the process (gloo) or hangs (NCCL), which is why the capacity is agreed, never assumed.
When the ranks recorded different layers (a rank-dependent forward pass), the checksums differ: the step keeps
each rank's own statistics and a warning says so.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from actdiag.hooks.keys import Key
from actdiag.hooks.layout import StatsMeta, merge_vectors

_Key = Key
_HEADER = 2  # payload length, layout checksum

# How each pending entry merges: per-rank extras sent along (host-side numbers) and the merge rule.
KIND_STATS = "stats"  # a statistics vector (layout.STATS); extras: numel, sample_n, estimated (0/1)
KIND_SUM = "sum"  # counts to add; extras: the number of elements they were counted over
KIND_UNITS = "units"  # per-unit [active counts..., ever-active mask...]; extras: samples per unit
KIND_REPLICATED = "replicated"  # identical on every rank (parameters under DDP): rank 0's row; the recorder's default


def active() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return bool(torch.distributed.get_world_size() > 1)


def rank() -> int:
    """This process's global rank, 0 outside torch.distributed."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0
    return int(torch.distributed.get_rank())


def sharded_parameters(model: nn.Module) -> bool:
    """True when parameters are sharded across ranks (FSDP): a rank holds only a slice of each parameter, so its
    parameter statistics are not the parameter's."""
    for m in model.modules():
        if type(m).__name__ == "FullyShardedDataParallel":
            return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return any(isinstance(p, DTensor) or type(p).__name__ == "FlatParameter" for p in model.parameters())


def unit_vector(y: torch.Tensor, unit_dim: int, ever_active: torch.Tensor) -> torch.Tensor:
    """Per-unit positive-output counts followed by the (updated) ever-active mask, as float64 on y's device.

    The distributed counterpart of `stats.unit_activity`: dead/rare/never are decided after the counts of all
    ranks are summed, which needs the per-unit numbers rather than this rank's verdicts.
    """
    with torch.autocast(device_type=y.device.type, enabled=False):
        dims = [d for d in range(y.dim()) if d != unit_dim]
        active = (y.detach() > 0).sum(dim=dims)
        ever_active.logical_or_(active > 0)
        return torch.cat([active.to(torch.float64), ever_active.to(torch.float64)])


def unit_verdicts(active: np.ndarray, ever: np.ndarray, samples: float, rare_below: float) -> np.ndarray:
    """[dead, rare, never] unit counts from per-unit positive counts and the ever-active mask."""
    dead = float(np.count_nonzero(active == 0))
    rare = float(np.count_nonzero(active < rare_below * samples))
    never = float(np.count_nonzero(ever == 0))
    return np.array([dead, rare, never])


Kinds = Mapping[_Key, str]


class _Entry(NamedTuple):
    """One vector of the step as sent: its place in the payload and what is sent along (`_extras`)."""

    key: _Key
    kind: str
    length: int
    extras: tuple[float, ...]
    meta: Any  # this rank's own meta


class StepMerger:
    """Gathers one recorded step's vectors from every rank and merges them (see the module docstring).

    Every rank must call `merge` for the same recorded steps, in the same order: the recorder does it in `end()`,
    which `Monitor.step()` reaches on every rank of a data-parallel loop.
    """

    def __init__(
        self,
        *,
        bins: int,
        rare_below: float,
        group: Any = None,
        on_mismatch: Callable[[str], None] | None = None,
    ) -> None:
        self.bins = bins
        self.rare_below = rare_below
        self.group = group
        self.capacity = 0
        self.collectives = 0  # how many collectives this merger issued (tests and benchmarks read it)
        self._on_mismatch = on_mismatch

    def _device(self) -> torch.device:
        backend = str(torch.distributed.get_backend(self.group)).lower()
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _rank(self) -> int:
        return int(torch.distributed.get_rank(self.group))

    def _gather(self, flat: torch.Tensor) -> np.ndarray:
        world = torch.distributed.get_world_size(self.group)
        out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
        fn = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
        fn(out, flat, group=self.group)
        self.collectives += 1
        return out.cpu().numpy().reshape(world, flat.numel())

    def merge(
        self, pending: Mapping[_Key, tuple[torch.Tensor, Any]], kinds: Kinds
    ) -> dict[_Key, tuple[np.ndarray, Any]]:
        """The merged host vectors of this step, keyed like `pending` (in the form `Recorder._decode` reads)."""
        device = self._device()
        # Sorted, so that the layout does not depend on the order in which hooks happened to fire.
        keys = sorted(pending)
        layout: list[_Entry] = []
        for key in keys:
            vec, meta = pending[key]
            kind = kinds.get(key, KIND_REPLICATED)
            layout.append(_Entry(key, kind, vec.numel(), _extras(kind, meta), meta))
        signature = repr([(tuple(e.key), e.kind, e.length, len(e.extras)) for e in layout]).encode()
        checksum = float(zlib.crc32(signature))  # < 2**32: exact in float64, and the same in every process
        extras = np.array([v for e in layout for v in e.extras], dtype=np.float64)
        payload = torch.cat([torch.from_numpy(extras).to(device), _concat(pending, keys, device)])
        length = payload.numel()
        rows = self._exchange(payload, length, checksum, device)
        lengths, sums = rows[:, 0], rows[:, 1]
        if not (np.all(lengths == length) and np.all(sums == checksum)):
            if self._on_mismatch is not None:
                self._on_mismatch(
                    "ranks recorded different layers or shapes at this step (a rank-dependent forward pass?); "
                    "this step keeps each rank's own statistics"
                )
            mine = rows[self._rank()]
            return self._split_local(mine[_HEADER : _HEADER + length], layout)
        return self._merge_rows(rows[:, _HEADER : _HEADER + length], layout)

    def _exchange(self, payload: torch.Tensor, length: int, checksum: float, device: torch.device) -> np.ndarray:
        head = torch.tensor([float(length), checksum], dtype=torch.float64, device=device)
        if length <= self.capacity:
            flat = torch.cat([head, payload, payload.new_zeros(self.capacity - length)])
        else:
            flat = torch.cat([head, payload.new_zeros(self.capacity)])  # too long: send the header only
        rows = self._gather(flat)
        need = int(rows[:, 0].max())
        if need <= self.capacity:
            return rows
        # Some rank's payload outgrew the agreed capacity. Every rank read the same headers, so every rank takes
        # this branch and the second gather has equal sizes everywhere.
        self.capacity = need
        return self._gather(torch.cat([head, payload, payload.new_zeros(need - length)]))

    def _merge_rows(self, rows: np.ndarray, layout: list[_Entry]) -> dict[_Key, tuple[np.ndarray, Any]]:
        n_extras = sum(len(e.extras) for e in layout)
        ex_rows, data = rows[:, :n_extras], rows[:, n_extras:]
        out: dict[_Key, tuple[np.ndarray, Any]] = {}
        xpos = pos = 0
        for key, kind, n, x, meta in layout:
            block = data[:, pos : pos + n]
            ex = ex_rows[:, xpos : xpos + len(x)]
            pos += n
            xpos += len(x)
            if kind == KIND_STATS:
                out[key] = merge_vectors(block, ex, self.bins, meta.layout)
            elif kind == KIND_SUM:
                out[key] = (block.sum(axis=0), float(ex.sum()))  # extras: the elements counted
            elif kind == KIND_UNITS:
                units = n // 2
                active_counts = block[:, :units].sum(axis=0)
                ever = block[:, units:].max(axis=0)
                samples = float(ex.sum())  # extras: samples per unit
                verdict = unit_verdicts(active_counts, ever, samples, self.rare_below)
                out[key._replace(kind="units")] = (verdict, None)
            else:
                out[key] = (block[0].copy(), meta)  # replicated: rank 0's numbers, shaped like ours
        return out

    def _split_local(self, row: np.ndarray, layout: list[_Entry]) -> dict[_Key, tuple[np.ndarray, Any]]:
        """This rank's own vectors, unmerged, read from its payload row: used when the ranks' layouts differ."""
        n_extras = sum(len(e.extras) for e in layout)
        data = row[n_extras:]
        out: dict[_Key, tuple[np.ndarray, Any]] = {}
        pos = 0
        for key, kind, n, x, meta in layout:
            vec = data[pos : pos + n]
            pos += n
            if kind == KIND_STATS:
                numel, sample_n, estimated = x
                out[key] = (vec, StatsMeta(int(numel), self.bins, int(sample_n), estimated > 0, meta.layout))
            elif kind == KIND_SUM:
                (counted,) = x
                out[key] = (vec, counted)
            elif kind == KIND_UNITS:
                units = n // 2
                (samples,) = x
                verdict = unit_verdicts(vec[:units], vec[units:], samples, self.rare_below)
                out[key._replace(kind="units")] = (verdict, None)
            else:
                out[key] = (vec, meta)
        return out


def _concat(pending: Mapping[_Key, tuple[torch.Tensor, Any]], keys: list[_Key], device: torch.device) -> torch.Tensor:
    """The vectors of `keys`, in that order, on `device`: one copy per source device, not one per vector."""
    by_device: dict[torch.device, list[int]] = {}
    for i, key in enumerate(keys):
        by_device.setdefault(pending[key][0].device, []).append(i)
    pieces: list[torch.Tensor | None] = [None] * len(keys)
    for idx in by_device.values():
        flat = torch.cat([pending[keys[i]][0].reshape(-1).to(torch.float64) for i in idx]).to(device)
        pos = 0
        for i in idx:
            n = pending[keys[i]][0].numel()
            pieces[i] = flat[pos : pos + n]
            pos += n
    if not keys:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.cat([p for p in pieces if p is not None])


def _extras(kind: str, meta: Any) -> tuple[float, ...]:
    if kind == KIND_STATS:
        return (float(meta.numel), float(meta.sample_n), float(meta.estimated))
    if kind in (KIND_SUM, KIND_UNITS):
        return (float(meta),)
    return ()
