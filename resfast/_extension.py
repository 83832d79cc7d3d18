"""Loads the compiled extension and checks it was built for this torch and Python."""

import sys

import torch

_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` in the resfast checkout"


def load():
    try:
        from resfast import _C
    except ImportError as e:
        raise ImportError(f"resfast: the compiled extension resfast._C could not be loaded ({e}); {_REBUILD}") from e
    if _C.torch_version != torch.__version__:
        raise ImportError(
            f"resfast: resfast._C was built against torch {_C.torch_version}, but torch {torch.__version__} "
            f"is running; {_REBUILD}"
        )
    running_python = sys.version.split()[0]
    if _C.python_version.split(".")[:2] != running_python.split(".")[:2]:
        raise ImportError(
            f"resfast: resfast._C was built for Python {_C.python_version}, but Python {running_python} "
            f"is running; {_REBUILD}"
        )
    return _C
