"""dimcli: Deep InfoMax (Hjelm et al., ICLR 2019) as a command-line tool and library.

The main entry points, imported lazily so that `import dimcli` stays cheap:

    dimcli.local_mi / dimcli.global_mi    the MI objectives (dimcli.objectives)
    dimcli.build_encoder                  registered encoders (dimcli.models)
    dimcli.load_encoder                   rebuild a trained encoder from its model file
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "local_mi": "dimcli.objectives",
    "global_mi": "dimcli.objectives",
    "build_encoder": "dimcli.models",
    "DIMModel": "dimcli.models",
    "load_encoder": "dimcli.modelfile",
    "save_encoder": "dimcli.modelfile",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dimcli' has no attribute {name!r}")
