"""What the format loaders share: the error type, path patterns and checks that name the file."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..sae import SAE
from . import safetensors_io as st

# Default cap on the features returned per token for SAEs whose activation has no k
# (relu, jumprelu): the kernels return a fixed number of (value, index) pairs.
DEFAULT_CAP = 256

_LAYER_IN_NAME = re.compile(r"(?<![A-Za-z])layer[_-]?(\d+)")  # layer12.sae.pt, layer_9/
# Hook points: blocks.12.hook_resid_post (TransformerLens), layers.12 / model.layers.12
# (transformers modules, sparsify), h.12 (GPT-2).
_LAYER_IN_HOOK = re.compile(r"(?<![A-Za-z])(?:blocks|layers|h)[._](\d+)")

class SAEFormatError(ValueError):
    """A file that is not a loadable SAE: the message names the file and the problem."""


def _last_int(pattern: "re.Pattern[str]", text: Optional[str]) -> Optional[int]:
    """The last match's number: in a path, the innermost directory or the file name wins."""
    found = pattern.findall(text or "")
    return int(found[-1]) if found else None


def _need(tensors: Dict[str, Any], names: List[str], path: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(f"{path}: missing tensor(s) {', '.join(missing)} "
                             f"(the file has: {', '.join(sorted(tensors)) or 'nothing'})")


def _shape_check(path: str, shapes: Dict[str, Any]) -> None:
    """shapes: {name: (actual shape, expected shape)}."""
    bad = [f"{n} is {tuple(got)}, expected {tuple(want)}" for n, (got, want) in shapes.items()
           if tuple(got) != tuple(want)]
    if bad:
        raise SAEFormatError(f"{path}: inconsistent shapes: {'; '.join(bad)}")


def _matrix(arr: Any, name: str, layout: str, path: str):
    if len(arr.shape) != 2:
        raise SAEFormatError(f"{path}: {name} must be 2-D {layout}, got shape {tuple(arr.shape)}")
    return tuple(arr.shape)


def _make(path: str, build: Callable[[], SAE]) -> SAE:
    """Builds the SAE, turning the constructor's complaints into format errors naming the file."""
    try:
        return build()
    except (ValueError, TypeError) as e:
        if isinstance(e, SAEFormatError):
            raise
        raise SAEFormatError(f"{path}: {e}") from None


def _f32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    """An array read from safetensors as float32 (bf16 bits widened exactly). Copies."""
    if st_dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def _read_cfg(folder: str) -> dict:
    cfg_path = os.path.join(folder, "cfg.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{cfg_path}: cannot read the config ({e})") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{cfg_path}: expected a JSON object")
    return cfg


def _read_safetensors(path: str) -> st.Contents:
    if not os.path.isfile(path):
        raise SAEFormatError(f"{path}: no such file")
    try:
        return st.read(path)
    except st.SafetensorsError as e:
        raise SAEFormatError(str(e)) from None
    except OSError as e:
        raise SAEFormatError(f"{path}: {e}") from None
