"""Reading a checkpoint into the model: a PyTorch or safetensors file, tensors only (never an arbitrary pickled
object), its state dict found under the usual keys, and the prefixes wrappers add to every key stripped."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from actdiag.errors import TargetError
from actdiag.usercode import describe_value, exc_text

CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes that wrappers add to every key: DistributedDataParallel/DataParallel ("module."), a LightningModule
# holding the network as `self.model` ("model."), torch.compile's OptimizedModule ("_orig_mod.").
CHECKPOINT_PREFIXES = ("module.", "model.", "_orig_mod.")


def _read_checkpoint(path: Path) -> Any:
    if not path.exists():
        raise TargetError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise TargetError(f"checkpoint {path} is a directory, not a file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise TargetError(f"reading {path} needs the safetensors package: pip install safetensors") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise TargetError(f"cannot read checkpoint {path}: {exc_text(exc)}") from exc
    try:
        # weights_only=True: tensors and plain containers only. A checkpoint is a pickle, and unpickling an
        # arbitrary object can run arbitrary code; actdiag never does that behind the user's back.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            _, _, tail = str(exc).partition("WeightsUnpickler error:")
            chunks = [c.strip() for c in tail.split("\n\n") if c.strip()]
            why = chunks[0] if chunks else exc_text(exc)
            raise TargetError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint ({why})") from exc
        raise TargetError(
            f"checkpoint {path} holds a pickled Python object ({found.group(1)}), and actdiag loads only tensors and "
            "plain containers (torch.load with weights_only=True), never arbitrary objects; save model.state_dict() "
            "instead of the whole model"
        ) from exc
    except Exception as exc:
        raise TargetError(f"cannot read checkpoint {path}: {exc_text(exc)}") from exc


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        keys = ", ".join(str(k) for k in list(obj)[:8]) or "none"
        raise TargetError(
            f"checkpoint {path} has no tensors at its top level nor under {'/'.join(CHECKPOINT_KEYS)} "
            f"(its keys: {keys})"
        )
    raise TargetError(f"checkpoint {path} holds {describe_value(obj)}, not a state dict")


def _strip_variants(keys: Sequence[str]) -> Iterator[tuple[tuple[str, ...], dict[str, str]]]:
    """(prefixes stripped, new key -> old key) for no stripping, one prefix, and two prefixes in either order."""
    seqs: list[tuple[str, ...]] = [()]
    seqs += [(p,) for p in CHECKPOINT_PREFIXES]
    seqs += [(a, b) for a in CHECKPOINT_PREFIXES for b in CHECKPOINT_PREFIXES if a != b]
    for seq in seqs:
        mapping: dict[str, str] = {}
        for key in keys:
            new = key
            for prefix in seq:
                if new.startswith(prefix):
                    new = new[len(prefix) :]
            mapping[new] = key
        yield seq, mapping


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Load a state dict into `model`; returns notes for the user (prefixes stripped, missing/unexpected keys)."""
    p = Path(path)
    state = _state_dict_of(_read_checkpoint(p), p)
    expected = set(model.state_dict())
    best_seq: tuple[str, ...] = ()
    best_map, best_hits = {k: k for k in state}, -1
    for seq, mapping in _strip_variants(list(state)):
        hits = len(expected & set(mapping))
        if hits > best_hits:
            best_seq, best_map, best_hits = seq, mapping, hits
    if best_hits == 0:
        got = ", ".join(list(state)[:3])
        want = ", ".join(list(expected)[:3]) or "no tensors"
        raise TargetError(
            f"none of the {len(state)} tensors in checkpoint {p} match the model: the checkpoint has {got}, ..., "
            f"the model expects {want}, ..."
        )
    renamed = {new: state[old] for new, old in best_map.items()}
    try:
        result = model.load_state_dict(renamed, strict=False)
    except RuntimeError as exc:
        details = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if "size mismatch" in ln]
        detail = "; ".join(details[:3]) if details else exc_text(exc)
        raise TargetError(f"checkpoint {p} does not fit the model: {detail}") from exc
    notes = []
    if best_seq:
        notes.append(f"checkpoint: stripped the prefix {' then '.join(repr(s) for s in best_seq)} from its keys")
    if result.missing_keys:
        notes.append(
            f"checkpoint: {len(result.missing_keys)} of the model's tensors are not in {p} and keep their initial "
            f"values: {_few(result.missing_keys)}"
        )
    if result.unexpected_keys:
        notes.append(
            f"checkpoint: {len(result.unexpected_keys)} tensors in {p} match nothing in the model and were ignored: "
            f"{_few(result.unexpected_keys)}"
        )
    return tuple(notes)


def _few(names: Sequence[str], n: int = 5) -> str:
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
