"""The fixed sample of a large tensor, and the small helpers the host and the device paths share.

Histograms (and, recording often, a large tensor's spread and zero count) are built from at most `sample_cap`
elements: tensors larger than that are sampled with a fixed pseudo-random index (a private generator, so the user's
RNG state is untouched) and the histogram is marked `sampled`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

# Histograms (and, recording often, a large tensor's spread and zeros) come from at most 8192 elements. A bin
# holding a share p of the values is then known to sqrt(p(1-p)/8192) <= 0.55% of the total. The sample's work is
# per tensor, whatever its size, and a larger sample costs more time for no visible change in a 64-bin histogram
# (bench/bench_kernel.py, BENCHMARKS.md). Below ATen's GRAIN_SIZE (32768), every op on the sample runs on the
# calling thread, with no OpenMP fork/join.
DEFAULT_SAMPLE_CAP = 8192

# Recording more often than every 10 steps (estimates allowed), a small tensor's spread, zeros and histograms come
# from a fixed sample of this many of its elements when it has more. Those passes read every element of every
# small tensor otherwise: on a deep narrow model they were most of a recorded step's end. A bin is then known to
# sqrt(p(1-p)/SMALL_SAMPLE) of the total.
SMALL_SAMPLE = 1024


class _SampleIndex:
    """Fixed pseudo-random element indices per (numel, cap, device), LRU-bounded.

    The indices are drawn by a private generator on the tensor's own device: the user's RNG state is untouched, and
    no host-to-device copy is needed (a pageable copy to CUDA would synchronise). Sorted, so the gather walks memory
    forward.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self._cache: OrderedDict[tuple[int, int, str], torch.Tensor] = OrderedDict()
        self._numpy: dict[tuple[int, int], np.ndarray] = {}
        self._max = max_entries

    def get(self, numel: int, cap: int, device: torch.device) -> torch.Tensor:
        key = (numel, cap, str(device))
        idx = self._cache.get(key)
        if idx is not None:
            self._cache.move_to_end(key)
            return idx
        seed = numel * 1_000_003 + cap
        try:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
            idx = torch.randint(0, numel, (cap,), generator=gen, device=device).sort().values
        except RuntimeError:  # a device without its own generator: draw on the CPU once, copy once
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            idx = torch.randint(0, numel, (cap,), generator=gen).sort().values.to(device)
        self._cache[key] = idx
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return idx

    def get_numpy(self, numel: int, cap: int) -> np.ndarray:
        """The CPU indices of `get` as a numpy array (cached beside them: the CPU path asks for them per tensor)."""
        key = (numel, cap)
        idx = self._numpy.get(key)
        if idx is None:  # the array keeps its tensor alive
            idx = self.get(numel, cap, _CPU).numpy()
            self._numpy[key] = idx
            if len(self._numpy) > self._max:
                self._numpy.pop(next(iter(self._numpy)))
        return idx


_CPU = torch.device("cpu")


_SAMPLES = _SampleIndex()


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # an unknown device type: be safe and switch autocast off
        return True


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    if x.dtype == torch.float64 or x.dtype in (torch.int64, torch.int32):
        return torch.float64
    return torch.float32


_BATCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_NUMPY_FLOATS = (torch.float32, torch.float64)


def numpy_view(flat: torch.Tensor) -> np.ndarray | None:
    """`flat` as a numpy array sharing its memory: CPU float32/float64 only; None for anything else (other dtypes,
    other devices, a tensor numpy cannot view such as one with a lazy negation bit)."""
    if flat.device.type != "cpu" or flat.dtype not in _NUMPY_FLOATS:
        return None
    try:
        return flat.numpy()
    except RuntimeError:
        return None


def segments(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, start offsets) of `arrays` laid end to end: the `indices` of np.ufunc.reduceat over their
    concatenation (every array must be non-empty)."""
    lens = np.fromiter((a.size for a in arrays), dtype=np.intp, count=len(arrays))
    starts = np.zeros(len(arrays), dtype=np.intp)
    np.cumsum(lens[:-1], out=starts[1:])
    return lens, starts
