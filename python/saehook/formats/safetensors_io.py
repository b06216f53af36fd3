"""A minimal zero-copy reader and writer of the safetensors format.

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}),
then the tensor data (offsets relative to the end of the header). The reader maps the file
read-only and returns numpy views into the mapping (bfloat16 as uint16, told apart by its
dtype string), so a multi-GB SAE costs no copy and no resident memory until it is read.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from .._arrays import WEIGHT_ALIGN
from . import _files

# safetensors dtype -> (numpy dtype, saehook tag or None when the kernels do not take it)
_DTYPES = {
    "F64": (np.float64, None), "F32": (np.float32, "f32"), "F16": (np.float16, "f16"),
    "BF16": (np.uint16, "bf16"), "I64": (np.int64, None), "I32": (np.int32, None),
    "I16": (np.int16, None), "I8": (np.int8, "int8"), "U64": (np.uint64, None),
    "U32": (np.uint32, None), "U16": (np.uint16, None), "U8": (np.uint8, None),
    "BOOL": (np.bool_, None),
}
_TAG_TO_ST = {"f32": "F32", "f16": "F16", "bf16": "BF16", "int8": "I8"}
_MAX_HEADER = 100 << 20  # the reference implementation's limit


class SafetensorsError(ValueError):
    """A file that is not valid safetensors; the message names the file (and tensor)."""


class Contents(NamedTuple):
    tensors: Dict[str, np.ndarray]  # read-only views into the mapped file
    dtypes: Dict[str, str]          # safetensors dtype strings ("F32", "BF16", ...)
    metadata: Dict[str, str]        # the header's __metadata__


def read(path: str) -> Contents:
    """Maps a .safetensors file and validates it as the reference implementation does
    (safetensors' Rust `read_metadata` + `Metadata::validate`), and more strictly where that
    is silent: a key given twice (tensor or `__metadata__` entry) is refused, not overwritten.

    - the 8-byte header length fits the file and the 100 MB limit; the header is UTF-8 JSON;
    - sorted by offsets, tensors tile the data section exactly: each begins where the previous
      ends (no gap, no overlap) and the last ends at the end of the file, so a header length off
      by one byte (every tensor shifted) or trailing bytes are refused;
    - each tensor spans exactly prod(shape) * itemsize bytes of a known dtype.
    Anything but a regular file is refused before it is read (a FIFO would block).
    """
    path = os.fspath(path)
    try:
        fd = _files.open_regular(path)
    except _files.NotARegularFile as e:
        raise SafetensorsError(str(e)) from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{path}: truncated file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise SafetensorsError(f"{path}: header length {n} does not fit the {size}-byte file "
                                   f"(truncated, or not a safetensors file)")
        try:
            header = _files.loads_strict(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
        # The mapping outlives the file object; a file without data cannot be mapped.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    data_len = size - 8 - n
    entries = []  # (begin, end, name, dtype string, shape)
    for name, info in header.items():
        try:
            st, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not (isinstance(st, str) and isinstance(shape, list) and isinstance(offsets, list)
                    and len(offsets) == 2 and all(_is_size(v) for v in (*shape, *offsets))):
                raise TypeError
        except (KeyError, TypeError):
            raise SafetensorsError(f"{path}: malformed header entry for tensor {name!r}: {info!r}") from None
        if st not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {st}")
        begin, end = offsets
        need = math.prod(shape) * np.dtype(_DTYPES[st][0]).itemsize  # exact: Python ints do not overflow
        if end < begin or end - begin != need:
            raise SafetensorsError(f"{path}: tensor {name!r} spans {end - begin} bytes but dtype {st} and shape "
                                   f"{shape} need {need}")
        if end > data_len:
            raise SafetensorsError(f"{path}: tensor {name!r} ends at byte {end} of a {data_len}-byte data "
                                   f"section: the file is truncated")
        entries.append((begin, end, name, st, shape))
    covered = 0
    for begin, end, name, _, _ in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin != covered:
            what = "overlaps the tensor before it" if begin < covered else f"leaves bytes {covered}..{begin} unused"
            raise SafetensorsError(f"{path}: tensor {name!r} begins at data byte {begin}: it {what} "
                                   f"(tensors must tile the data section)")
        covered = end
    if covered != data_len:
        raise SafetensorsError(f"{path}: the tensors cover {covered} of the {data_len} bytes after the "
                               f"{n}-byte header: the header length or the file size is wrong")
    tensors, dtypes = {}, {}
    for begin, end, name, st, shape in entries:
        np_dtype = np.dtype(_DTYPES[st][0])
        if end == begin:
            try:
                arr = np.zeros(shape, dtype=np_dtype)
            except ValueError as e:  # e.g. a dimension beyond numpy's limits next to a 0
                raise SafetensorsError(f"{path}: tensor {name!r} has shape {shape}: {e}") from None
        else:
            arr = np.frombuffer(mm, dtype=np_dtype, count=(end - begin) // np_dtype.itemsize,
                                offset=8 + n + begin).reshape(shape)
        tensors[name], dtypes[name] = arr, st
    return Contents(tensors, dtypes, dict(meta))


def _is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def tag_of(st_dtype: str) -> Optional[str]:
    """saehook dtype tag of a safetensors dtype (None for dtypes the kernels do not take)."""
    return _DTYPES.get(st_dtype, (None, None))[1]


def write(path: str, tensors: Mapping[str, Tuple[np.ndarray, str]], metadata: Mapping[str, str]) -> None:
    """Writes {name: (array, tag)} (tag f32/f16/bf16/int8; bf16 arrays hold uint16 bits).

    Atomic: a temporary file in the same directory, then os.replace, so a reader never sees a
    half-written file and SAEs still mapping the old file keep valid memory.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # say so, rather than fail on the name of the temporary file
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    arrays = {name: np.ascontiguousarray(arr) for name, (arr, _) in tensors.items()}
    # Tensors whose size is a multiple of WEIGHT_ALIGN first (each then starts on a 64-byte
    # boundary, given the header padding below: the weight matrices at every usual shape), then
    # the rest with wider elements first (as the reference writer orders them), so that every
    # tensor starts at a multiple of its element size.
    order = sorted(arrays, key=lambda name: (arrays[name].nbytes % WEIGHT_ALIGN != 0, -arrays[name].itemsize, name))
    header: Dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    for name in order:
        arr = arrays[name]
        header[name] = {"dtype": _TAG_TO_ST[tensors[name][1]], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Padded with spaces (as the reference pads to 8 bytes) so that the data starts at a
    # multiple of 64 bytes of the file, hence of its page-aligned mapping: the weight matrices,
    # whose offsets are sums of sizes that are multiples of 64 at the usual shapes, then begin on
    # a cache line (see _arrays.WEIGHT_ALIGN).
    raw += b" " * (-(8 + len(raw)) % WEIGHT_ALIGN)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in order:
                f.write(memoryview(arrays[name].reshape(-1).view(np.uint8)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
