"""optmech — Fenchel-Young losses, the structural matrix A_x = J_x J_xᵀ and the optimisation-mechanism
bounds of Qi, Gong & Li (arXiv 2503.23016) for any PyTorch model.

Public API (imported lazily, so ``import optmech`` stays light)::

    optmech.get_loss(name, **kw)                      # Fenchel-Young losses
    optmech.structural_matrix(model, x, method=...)   # StructuralMatrix: .A (batch, C, C), .method, .route
    optmech.Probe(model, loss=...).measure(x, y)      # per-sample Measurement
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "get_loss": "optmech.losses",
    "available_losses": "optmech.losses",
    "FenchelYoungLoss": "optmech.losses",
    "structural_matrix": "optmech.structure",
    "EngineMethod": "optmech.structure",
    "EngineOptions": "optmech.structure",
    "StructuralMatrix": "optmech.structure",
    "RouteReport": "optmech.structure",
    "GenericPathWarning": "optmech.structure",
    "clear_cache": "optmech.structure",
    "NonFiniteLogitsError": "optmech.errors",
    "NonFiniteStructureError": "optmech.errors",
    "Probe": "optmech.probe",
    "ConsistencyError": "optmech.probe",
    "Measurement": "optmech.metrics",
    "COLUMNS": "optmech.metrics",
    "read_records": "optmech.records",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optmech' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
