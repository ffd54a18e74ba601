"""What to try for each finding, with code that names the user's own layers, and checking it on a copy of the model.

`CATALOGUE` holds one entry per fix code: its text and snippet templates and whether `--try-fixes` can verify it by
re-running; `REMEDIES` says which fixes each finding code gets. `attach_fixes(findings, layers, model=...)` picks
the remedies for each finding by what surrounds the layers it names: He initialisation where a ReLU-family
activation follows a weight layer, Xavier where tanh/sigmoid (or nothing) does, BatchNorm for conv and MLP layers,
LayerNorm for sequences and single-sample batches, and so on. Each snippet can be pasted after the model is built
(`model` being the user's model; the training-loop ones name `optimizer`, `criterion`, `x`, `y` and `loss`). Layers
are named the way their containers index them (`model.features[3]`, `model.heads["0"]`), or through
`get_submodule`/`set_submodule` where the container is unknown; mixed-precision snippets take the device from the
batch (`x.device.type`). The rules never see fixes: they are attached after diagnosis, where the report is assembled.

`verify_fixes(model, report, rerun)` applies every verifiable fix (re-initialisation, inserting a normalisation
layer, swapping an activation) to a deep copy, re-runs the check through `rerun` (the caller's `actdiag.inspect`,
passed in so that this module never reaches up to the engine) and marks the fix verified when the finding went away
without a new warning taking its place, with the numbers before and after.

The rooms: `catalogue` (the data), `naming` (how a snippet names a layer), `plans` (a fix filled in for the layers a
finding names), `remedies` (which fixes each finding gets) and `verify` (trying them on a copy).
"""

from actdiag.fixes.catalogue import CATALOGUE, FIX_CODES, VERIFIABLE, FixEntry
from actdiag.fixes.naming import module_assign, module_expr
from actdiag.fixes.remedies import REMEDIES, attach_fixes
from actdiag.fixes.verify import verify_fixes

__all__ = [
    "CATALOGUE",
    "FIX_CODES",
    "REMEDIES",
    "VERIFIABLE",
    "FixEntry",
    "attach_fixes",
    "module_assign",
    "module_expr",
    "verify_fixes",
]
