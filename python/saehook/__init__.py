"""saehook: Top-K sparse autoencoders inside a language model's forward pass.

Compiled CPU kernels (encode with fused Top-K, sparse decode, steering) behind a C API,
loaders for the published SAE formats, and hooks for llama.cpp and transformers.
"""
from __future__ import annotations

import os as _os

from .sae import (
    SAE,
    available_isas,
    cpu_info,
    get_isa,
    get_num_threads,
    set_cpu_class,
    set_isa,
    set_num_threads,
)
from .steering import Steering, SteeringState
from .steering_spec import SpecError, When, load_spec
from .formats import SAEFormatError, SAESet, load

__version__ = "0.1.0"

__all__ = [
    "SAE", "SAESet", "SAEFormatError", "Steering", "load",
    "set_num_threads", "get_num_threads", "set_isa", "get_isa", "available_isas",
    "cpu_info", "set_cpu_class",
    "get_include", "get_library",
    "SteeringState", "When", "load_spec", "SpecError",
]


def _binary_dir() -> str:
    # The compiled files sit next to _core (outside the sources in an editable install).
    from . import _core

    return _os.path.dirname(_core.__file__)


def get_include() -> str:
    """Directory of saehook.h (for C/C++ programs using the C API)."""
    return _os.path.join(_binary_dir(), "include")


def get_library() -> str:
    """Path of libsaehook (the C API's shared library)."""
    here = _binary_dir()
    for name in _os.listdir(here):
        if name.startswith("libsaehook") and (".so" in name or name.endswith(".dylib") or name.endswith(".dll")):
            return _os.path.join(here, name)
    raise FileNotFoundError("libsaehook was not found next to the package")
