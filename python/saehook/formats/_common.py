"""What the format loaders share: the error type, path patterns and checks that name the file."""
from __future__ import annotations

import os
import re
import zipfile
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import numpy as np

from ..sae import SAE
from . import _files
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


def _require_regular(path: str) -> None:
    """Refuses a missing path or one that is not a regular file (a FIFO would block the reader)."""
    try:
        _files.require_regular(path)
    except FileNotFoundError:
        raise SAEFormatError(f"{path}: no such file") from None
    except OSError as e:
        raise SAEFormatError(str(e) if isinstance(e, _files.NotARegularFile) else f"{path}: {e}") from None


def _read_json(path: str) -> Any:
    """A JSON file read strictly: regular file, UTF-8, no duplicate keys, no NaN literals."""
    _require_regular(path)
    try:
        with open(path, encoding="utf-8") as f:
            return _files.loads_strict(f.read())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SAEFormatError(f"{path}: cannot read the config ({e})") from None


def _read_cfg(folder: str) -> dict:
    cfg_path = os.path.join(folder, "cfg.json")
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{cfg_path}: expected a JSON object")
    return cfg


# The strings sparsify's config loader accepts for a boolean (simple_parsing's str2bool, which
# its Serializable.from_dict applies to bool fields; stripped, any case).
SPARSIFY_BOOL_STRINGS = {"yes": True, "true": True, "t": True, "y": True, "1": True,
                         "no": False, "false": False, "f": False, "n": False, "0": False}


def _cfg_bool(cfg: dict, key: str, default: bool, where: str, *, strings: Optional[Dict[str, bool]] = None) -> bool:
    """A boolean config field: JSON true/false, or one of `strings` (the spellings the
    format's own loader converts). SAELens fills its config dataclasses from json.load without
    conversion, so its code would take the string "false" as true: it gets no strings, and such
    a value is refused rather than guessed."""
    val = cfg.get(key, default)
    if val is None:
        return default
    if isinstance(val, bool):
        return val
    if strings is not None:
        if isinstance(val, str) and val.strip().lower() in strings:
            return strings[val.strip().lower()]
        if isinstance(val, int) and val in (0, 1):
            return bool(val)
    accepted = "true or false (a JSON boolean)" + (f" or one of {', '.join(strings)}" if strings else "")
    raise SAEFormatError(f"{where}: {key} must be {accepted}, got {val!r}")


def _cfg_int(cfg: dict, key: str, where: str, *, default: Optional[int] = None,
             strings: bool = False) -> Optional[int]:
    """An integer config field: a JSON integer (64, or 64.0 as some writers put it; not a bool,
    not 6.5). strings=True also takes "64" (sparsify's loader converts with int())."""
    val = cfg.get(key, default)
    if val is None:
        return None
    if isinstance(val, float) and val.is_integer():
        val = int(val)
    if strings and isinstance(val, str) and val.strip().isdigit():
        val = int(val)
    if isinstance(val, bool) or not isinstance(val, int):
        raise SAEFormatError(f"{where}: {key} must be an integer, got {val!r}")
    return val


class ZipEntry(NamedTuple):
    info: zipfile.ZipInfo
    data_offset: int  # where the member's (stored) bytes begin in the file


def _zip_entries(path: str, kind: str = "zip archive") -> Dict[str, ZipEntry]:
    """The members of a zip archive (a torch.save .pt or an .npz) by name, with the file offset
    of each member's data (from its local header, whose extra field may differ from the central
    directory's). Refused: a name given twice (readers disagree on which copy they use), a local
    header that does not match the directory, data that runs past the end of the file."""
    _require_regular(path)
    out: Dict[str, ZipEntry] = {}
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
            size = os.fstat(raw.fileno()).st_size
            for info in z.infolist():
                if info.filename in out:
                    raise SAEFormatError(f"{path}: the zip archive holds two records named {info.filename}; refused")
                raw.seek(info.header_offset)
                local = raw.read(30)
                name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
                if len(local) < 30 or local[:4] != b"PK\x03\x04" or \
                        raw.read(name_len).decode("utf-8", "replace") != info.filename:
                    raise SAEFormatError(f"{path}: corrupt zip record {info.filename} (its local header does not "
                                         f"match the directory)")
                start = info.header_offset + 30 + name_len + extra_len
                if start + info.compress_size > size:
                    raise SAEFormatError(f"{path}: zip record {info.filename} runs past the end of the "
                                         f"{size}-byte file (truncated)")
                out[info.filename] = ZipEntry(info, start)
    except SAEFormatError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SAEFormatError(f"{path}: cannot be read as {'an' if kind[0] in '.aeiou' else 'a'} {kind} "
                             f"({type(e).__name__}: {e})") from None
    return out


def mapped_tensors(sae: SAE) -> List[str]:
    """Names of the SAE's arrays that are memory-mapped from a file (not copies)."""
    return [name for name, arr in sae.arrays().items() if arr is not None and _files.mapped_file(arr)]


def _read_safetensors(path: str) -> st.Contents:
    try:
        return st.read(path)
    except st.SafetensorsError as e:
        raise SAEFormatError(str(e)) from None
    except FileNotFoundError:
        raise SAEFormatError(f"{path}: no such file") from None
    except OSError as e:
        raise SAEFormatError(f"{path}: {e}") from None
