"""How a snippet names the user's layers: `model.features[3]`, `model.heads["0"]` where the containers index their
children that way, `model.get_submodule(...)` / `model.set_submodule(...)` where that is not certain."""

from __future__ import annotations

import keyword
import re

from torch import nn

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _quote(text: str) -> str:
    """A string literal in the snippets' double quotes."""
    return f'"{text}"' if '"' not in text and "\\" not in text and text.isprintable() else repr(text)


def _access(name: str, model: nn.Module | None) -> str | None:
    """Python expression for submodule `name` of `model` by attribute and index, or None when none is certain to
    work: indices where the container takes them (Sequential and ModuleList by position, ModuleDict by key),
    attributes elsewhere. Without the model, digits and other non-identifiers cannot be told apart (a ModuleDict
    with key "0" takes ["0"], a Sequential [0]), so only a path of identifiers gets an expression."""
    expr = "model"
    module: nn.Module | None = model
    for part in name.split("."):
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and part.isdigit():
            expr += f"[{part}]"
        elif isinstance(module, nn.ModuleDict):
            expr += f"[{_quote(part)}]"
        elif _IDENT.match(part) and not keyword.iskeyword(part) and not hasattr(type(module), part):
            # (an attribute of the class, e.g. a child named "train", would shadow the child)
            expr += f".{part}"
        else:
            return None
        if module is not None:
            module = module._modules.get(part)
            if module is None:
                return None  # not a submodule of this model: say nothing certain
    return expr


def module_expr(name: str, root: str = "model", model: nn.Module | None = None) -> str:
    """Python expression for a submodule: "features.3.conv1" -> "model.features[3].conv1" (with `model`, whose
    containers say how each part is indexed), or `model.get_submodule("features.3.conv1")` where that is not
    certain. A functional activation's record ("mlp:relu", CONTRACT.md section 6) names the module whose forward
    applies it ("model.mlp")."""
    name = name.rpartition(":")[0] if ":" in name else name
    if not name:
        return root
    expr = _access(name, model)
    if expr is None:
        return f"{root}.get_submodule({_quote(name)})"
    return root + expr[len("model") :]


def module_assign(name: str, value: str, model: nn.Module | None = None) -> str:
    """A statement that puts module expression `value` in place of submodule `name`."""
    expr = _access(name, model) if name else None
    return f"{expr} = {value}" if expr is not None else f"model.set_submodule({_quote(name)}, {value})"


def wrapped(items: list[str], indent: str = "    ", width: int = 100) -> str:
    """Comma-separated items, several per line, each line under `width` characters."""
    lines: list[str] = []
    line = ""
    for item in items:
        piece = f"{item},"
        if line and len(indent) + len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = piece
        else:
            line = f"{line} {piece}" if line else piece
    if line:
        lines.append(line)
    return "\n".join(indent + ln for ln in lines)
