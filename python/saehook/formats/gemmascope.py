"""Gemma Scope: params.npz (np.savez of W_enc, W_dec, b_enc, b_dec, threshold)."""
from __future__ import annotations

import math
import os
import re
import zipfile
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

from ..sae import SAE
from ._common import (
    DEFAULT_CAP, _LAYER_IN_NAME, SAEFormatError, ZipEntry, _last_int, _make, _matrix, _need, _shape_check,
    _zip_entries,
)

_L0_IN_PATH = re.compile(r"average_l0_(\d+)")                 # Gemma Scope: .../average_l0_71/


class _Member(NamedTuple):
    """One .npy member of an .npz, its header read but its data not yet."""
    shape: Tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    entry: ZipEntry
    data_start: int  # file offset of the array data (stored members only)


def _npz_members(path: str) -> Dict[str, _Member]:
    """The .npy headers of an .npz, checked against the zip's record sizes: each member's
    record holds exactly its header plus prod(shape) * itemsize bytes. Nothing is decompressed
    beyond the headers, so a small file declaring huge arrays costs nothing before the loader's
    shape checks. Object arrays are refused (never unpickled); a name given twice is refused."""
    out: Dict[str, _Member] = {}
    entries = _zip_entries(path, ".npz archive")
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
            for fname, entry in entries.items():
                if not fname.endswith(".npy"):
                    continue
                info, name = entry.info, fname[:-4]
                if info.compress_type == zipfile.ZIP_STORED:
                    raw.seek(entry.data_offset)
                    f = raw
                else:
                    f = z.open(info)  # streams: reading the header inflates only its first block
                start = f.tell()
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise SAEFormatError(f"{path}: {fname} has unsupported .npy version {version}")
                shape, fortran, dt = read_header(f)
                header_len = f.tell() - start
                if f is not raw:
                    f.close()
                if dt.hasobject:
                    raise SAEFormatError(f"{path}: {name} holds Python objects; refused")
                nbytes = math.prod(shape) * dt.itemsize
                if header_len + nbytes != info.file_size:
                    raise SAEFormatError(f"{path}: {name} has shape {shape} ({nbytes} bytes of {dt}) but its "
                                         f"zip entry holds {info.file_size - header_len} data bytes")
                out[name] = _Member(tuple(shape), dt, fortran, entry, entry.data_offset + header_len)
    except SAEFormatError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SAEFormatError(f"{path}: cannot be read as an .npz archive ({type(e).__name__}: {e})") from None
    return out


def _npz_array(path: str, m: _Member) -> np.ndarray:
    """A member's data: memory-mapped at its offset when stored (np.savez), read when
    compressed (np.savez_compressed; its size was checked against the shape already)."""
    try:
        if m.entry.info.compress_type == zipfile.ZIP_STORED:
            if m.entry.info.file_size == m.data_start - m.entry.data_offset:  # no data: cannot map 0 bytes
                return np.zeros(m.shape, m.dtype)
            return np.memmap(path, dtype=m.dtype, mode="r", offset=m.data_start, shape=m.shape,
                             order="F" if m.fortran else "C")
        with zipfile.ZipFile(path) as z, z.open(m.entry.info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SAEFormatError(f"{path}: cannot be read as an .npz archive ({type(e).__name__}: {e})") from None


def load_gemmascope(path: str, k: Optional[int], layer: Optional[int]) -> SAE:
    """Gemma Scope's params.npz: W_enc (d_model, d_sae), W_dec (d_sae, d_model), b_enc, b_dec,
    threshold. JumpReLU as Gemma Scope defines it: pre = x @ W_enc + b_enc,
    acts = pre * (pre > threshold) (the thresholds are positive, so this is saehook's jumprelu);
    no b_dec subtraction; x_hat = acts @ W_dec + b_dec.

    W_enc is transposed into one float32 copy; W_dec stays mapped when the archive stores it
    uncompressed. At most k features per token are returned (default min(d_sae, 256)).
    """
    arrs = _npz_members(path)
    for low in ("w_enc", "w_dec"):  # some releases spell the matrices in lower case (as SAELens handles)
        if low in arrs and "W" + low[1:] not in arrs:
            arrs["W" + low[1:]] = arrs.pop(low)
    _need(arrs, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], path)
    d_model, d_sae = _matrix(arrs["W_enc"], "W_enc", "(d_model, d_sae)", path)
    _shape_check(path, {"W_dec": (arrs["W_dec"].shape, (d_sae, d_model)), "b_enc": (arrs["b_enc"].shape, (d_sae,)),
                        "b_dec": (arrs["b_dec"].shape, (d_model,)),
                        "threshold": (arrs["threshold"].shape, (d_sae,))})
    not_float = [f"{n} is {arrs[n].dtype}" for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
                 if arrs[n].dtype.kind != "f"]
    if not_float:
        raise SAEFormatError(f"{path}: {'; '.join(not_float)}; Gemma Scope's arrays are floating point")
    arrs = {name: _npz_array(path, arrs[name]) for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    if np.any(np.asarray(arrs["threshold"]) < 0):  # then pre * (pre > threshold) keeps negative values
        raise SAEFormatError(f"{path}: negative JumpReLU thresholds are not supported (Gemma Scope's are positive)")
    full = os.path.abspath(path)
    # Gemma Scope's layout: <release>/layer_<n>/width_<w>/average_l0_<l0>/params.npz
    meta = {"format": "gemma-scope", "hook_point": "resid_post", "source": path,
            "layer": layer if layer is not None else _last_int(_LAYER_IN_NAME, full)}
    l0 = _last_int(_L0_IN_PATH, full)
    if l0 is not None:
        meta["average_l0"] = l0
    W_dec = arrs["W_dec"]
    if W_dec.dtype not in (np.float32, np.float16):
        W_dec = W_dec.astype(np.float32)
    return _make(path, lambda: SAE(
        np.ascontiguousarray(arrs["W_enc"].T, dtype=np.float32), W_dec, arrs["b_enc"], arrs["b_dec"],
        threshold=arrs["threshold"], k=k or min(d_sae, DEFAULT_CAP), activation="jumprelu",
        dec_layout="rows", metadata=meta))
