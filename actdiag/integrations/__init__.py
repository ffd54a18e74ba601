"""Callbacks for training frameworks, thin adapters over `actdiag.watch`.

    from actdiag.integrations.lightning import ActdiagCallback      # pip install "actdiag[lightning]"
    from actdiag.integrations.transformers import ActdiagCallback   # pip install "actdiag[transformers]"

Nothing here is imported by `import actdiag`: each submodule imports its framework when it is itself imported, and
raises ImportError with the install command when the framework is missing.
"""

from __future__ import annotations
