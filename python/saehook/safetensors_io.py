"""A minimal zero-copy reader and writer of the safetensors format.

Layout: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}),
then the tensor data (offsets relative to the end of the header). The reader maps the file
read-only and returns numpy views into the mapping (bfloat16 as uint16 with a tag), so a
multi-GB SAE costs no copy and no resident memory until the kernels touch it.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

# safetensors dtype -> (numpy dtype, saehook tag or None)
_DTYPES = {
    "F64": (np.float64, None), "F32": (np.float32, "f32"), "F16": (np.float16, "f16"),
    "BF16": (np.uint16, "bf16"), "I64": (np.int64, None), "I32": (np.int32, None),
    "I16": (np.int16, None), "I8": (np.int8, "int8"), "U8": (np.uint8, None), "BOOL": (np.bool_, None),
}
_TAG_TO_ST = {"f32": "F32", "f16": "F16", "bf16": "BF16", "int8": "I8"}
_MAX_HEADER = 100 << 20


class SafetensorsError(ValueError):
    pass


def read(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str], Dict[str, str]]:
    """(tensors, dtypes, metadata): numpy views into a read-only mapping of the file."""
    size = os.path.getsize(path)
    if size < 8:
        raise SafetensorsError(f"{path}: file is truncated ({size} bytes, no header)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise SafetensorsError(f"{path}: header length {n} exceeds the file ({size} bytes): truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    tensors, dtypes = {}, {}
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            st, shape, (b, e) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: malformed header entry for tensor {name!r}") from None
        if st not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {st}")
        np_dtype, _ = _DTYPES[st]
        count = int(np.prod(shape)) if shape else 1
        if e - b != count * np.dtype(np_dtype).itemsize or b < 0 or e < b:
            raise SafetensorsError(f"{path}: tensor {name!r} has {e - b} bytes, its dtype and shape {shape} need "
                                   f"{count * np.dtype(np_dtype).itemsize}")
        if e > data_len:
            raise SafetensorsError(f"{path}: tensor {name!r} ends at byte {e} of a {data_len}-byte data section: file truncated")
        if count == 0:
            arr = np.zeros(shape, dtype=np_dtype)
        else:
            arr = np.frombuffer(mm, dtype=np_dtype, count=count, offset=8 + n + b).reshape(shape)
        tensors[name] = arr
        dtypes[name] = st
    return tensors, dtypes, {str(k): str(v) for k, v in meta.items()}


def tag_of(st_dtype: str) -> Optional[str]:
    """saehook dtype tag of a safetensors dtype (None for dtypes the kernels do not take)."""
    return _DTYPES.get(st_dtype, (None, None))[1]


def write(path: str, tensors: Mapping[str, Tuple[np.ndarray, str]], metadata: Mapping[str, str]) -> None:
    """Writes {name: (array, tag)} (tag f32/f16/bf16/int8; bf16 arrays are uint16 bits)
    atomically: a temporary file in the same directory, then os.replace."""
    header: Dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    arrays = []
    for name, (arr, tag) in tensors.items():
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": _TAG_TO_ST[tag], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference implementation pads the header to 8 bytes
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for arr in arrays:
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
