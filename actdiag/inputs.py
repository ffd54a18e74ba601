"""The model's inputs: random ones for --input-shape, the file's `example_input()`, and its `example_target()`
bound into a two-argument loss; all moved to the model's device."""

from __future__ import annotations

import inspect as pyinspect
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

from actdiag.errors import TargetError
from actdiag.hooks.recorder import first_tensor
from actdiag.inspection import Inputs, LossFn
from actdiag.usercode import Stage, describe_value, needs_args, run_user

DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def _vocab_size(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return int(m.num_embeddings)
    return None


def synthetic_inputs(
    model: nn.Module,
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[str] = (),
    value_range: tuple[float, float] | None = None,
    seed: int = 0,
) -> Inputs:
    """Random inputs for --input-shape: standard normal floats (uniform in `value_range` if given), integers
    uniform in [LOW, HIGH) from `value_range`, else in [0, vocabulary size) of the model's first nn.Embedding."""
    if len(dtypes) not in (0, 1, len(shapes)):
        raise TargetError(
            f"got {len(shapes)} --input-shape and {len(dtypes)} --input-dtype; give one dtype for all inputs "
            "or one per input"
        )
    names = list(dtypes) if len(dtypes) == len(shapes) else list(dtypes or ["float32"]) * len(shapes)
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for shape, name in zip(shapes, names):
        dtype = DTYPES[name]
        if dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        elif dtype.is_floating_point:
            t = torch.randn(shape, generator=gen)
            if value_range is not None:
                low, high = value_range
                t = torch.rand(shape, generator=gen) * (high - low) + low
            t = t.to(dtype)
        else:
            if value_range is not None:
                low, high = int(value_range[0]), int(value_range[1])
            else:
                vocab = _vocab_size(model)
                if vocab is None:
                    raise TargetError(
                        f"--input-dtype {name} needs --input-range LOW,HIGH (e.g. 0,30000 for token ids): "
                        "the model has no nn.Embedding to take the vocabulary size from"
                    )
                low, high = 0, vocab
            if not low < high:
                raise TargetError(f"--input-range {low},{high} holds no integer for --input-dtype {name}")
            t = torch.randint(low, high, shape, generator=gen).to(dtype)
        tensors.append(t)
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def example_inputs(module: ModuleType, where: str) -> Inputs | None:
    """What `example_input()` in the file returns (also accepted: a module-level value of that name), checked."""
    if not hasattr(module, "example_input"):
        return None
    obj = module.example_input
    label = "example_input()" if callable(obj) else "example_input"
    if callable(obj):
        needed = needs_args(obj)
        if needed:
            raise TargetError(f"example_input() in {where} must take no arguments, it needs {', '.join(needed)}")
        value = run_user(Stage("inputs", "example_input()"), obj)
    else:
        value = obj
    ok = isinstance(value, torch.Tensor)
    if isinstance(value, (tuple, list)):
        ok = len(value) > 0 and first_tensor(value) is not None
        value = tuple(value)
    elif isinstance(value, Mapping):
        ok = len(value) > 0 and all(isinstance(k, str) for k in value) and first_tensor(value) is not None
        value = dict(value)
    if not ok:
        empty = isinstance(value, (tuple, dict))
        got = f"a {type(value).__name__} with no tensor in it" if empty else describe_value(value)
        raise TargetError(
            f"{label} returned {got}; it must return a tensor, a tuple of tensors (positional inputs) "
            "or a dict of tensors (keyword inputs)"
        )
    return value


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _positional_arity(fn: Any) -> tuple[int, float]:
    """(required, accepted) positional parameters of `fn`; accepted is inf with *args, (0, inf) when unknown."""
    try:
        params = pyinspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0, float("inf")
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(1 for p in positional if p.default is p.empty)
    star = any(p.kind == p.VAR_POSITIONAL for p in params)
    return required, float("inf") if star else float(len(positional))


def with_target(module: ModuleType, where: str, loss_fn: LossFn | None, device: torch.device) -> LossFn | None:
    """With `example_target()` in the file, `loss_fn(output, inputs, target)` bound to what it returns (on the
    model's device), so the rest of actdiag calls a two-argument loss; without it, `loss_fn` as it is."""
    has_target = hasattr(module, "example_target")
    if loss_fn is None:
        if has_target:
            raise TargetError(f"{where} defines example_target() but no loss_fn(output, inputs, target) to give it to")
        return None
    required, accepted = _positional_arity(loss_fn)
    if not has_target:
        if required >= 3:
            raise TargetError(
                f"loss_fn in {where} takes a target, but the file has no example_target(); add "
                "`def example_target(): return ...` returning the labels for example_input()"
            )
        return loss_fn
    if accepted < 3:
        raise TargetError(
            f"{where} defines example_target(), but its loss_fn takes no target; write it as "
            "loss_fn(output, inputs, target)"
        )
    obj = module.example_target
    if callable(obj):
        if needs_args(obj):
            raise TargetError(f"example_target() in {where} must take no arguments")
        target = run_user(Stage("inputs", "example_target()"), obj)
    else:
        target = obj
    target = to_device(target, device)
    user_loss = loss_fn

    def loss_with_target(output: Any, inputs: Any) -> torch.Tensor:
        return user_loss(output, inputs, target)  # type: ignore[call-arg]

    return loss_with_target
