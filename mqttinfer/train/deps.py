"""Import guard for the ``train`` extra (torch, onnx, onnxscript)."""

from __future__ import annotations

import importlib.util

from mqttinfer.errors import DependencyError

_INSTALL_HINT = "pip install 'mqttinfer[train]'"


def require_train_extra(*modules: str) -> None:
    """Raise :class:`DependencyError` unless every module (default: torch) is importable."""
    names = modules or ("torch",)
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise DependencyError(
            f"training needs {', '.join(missing)}, which is not installed; "
            f"install the train extra with: {_INSTALL_HINT}"
        )
