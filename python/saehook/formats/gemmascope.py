"""Gemma Scope: params.npz (np.savez of W_enc, W_dec, b_enc, b_dec, threshold)."""
from __future__ import annotations

import os
import re
import zipfile
from typing import Dict, Optional

import numpy as np

from ..sae import SAE
from ._common import (
    DEFAULT_CAP, _LAYER_IN_NAME, SAEFormatError, _last_int, _make, _matrix, _need, _shape_check,
)

_L0_IN_PATH = re.compile(r"average_l0_(\d+)")                 # Gemma Scope: .../average_l0_71/


def _npz_arrays(path: str) -> Dict[str, np.ndarray]:
    """The arrays of an .npz. Members stored uncompressed (np.savez) are memory-mapped at their
    data offset; compressed ones (np.savez_compressed) are read. Object arrays are refused
    (never unpickled)."""
    out: Dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                if info.compress_type != zipfile.ZIP_STORED:
                    with z.open(info) as f:
                        out[name] = np.lib.format.read_array(f, allow_pickle=False)
                    continue
                # Local file header: 30 fixed bytes, then the name and an extra field whose
                # lengths (offsets 26, 28) may differ from the central directory's copy.
                raw.seek(info.header_offset)
                local = raw.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise SAEFormatError(f"{path}: corrupt zip entry {info.filename}")
                start = (info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                         + int.from_bytes(local[28:30], "little"))
                raw.seek(start)
                version = np.lib.format.read_magic(raw)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise SAEFormatError(f"{path}: {info.filename} has unsupported .npy version {version}")
                shape, fortran, dt = read_header(raw)
                if dt.hasobject:
                    raise SAEFormatError(f"{path}: {name} holds Python objects; refused")
                nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                if raw.tell() - start + nbytes != info.file_size:
                    raise SAEFormatError(f"{path}: {name} has shape {shape} ({nbytes} bytes of {dt}) but its "
                                         f"zip entry holds {info.file_size - (raw.tell() - start)} data bytes")
                out[name] = (np.memmap(path, dtype=dt, mode="r", offset=raw.tell(), shape=shape,
                                       order="F" if fortran else "C") if nbytes else np.zeros(shape, dt))
    except SAEFormatError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SAEFormatError(f"{path}: cannot be read as an .npz archive ({type(e).__name__}: {e})") from None
    return out


def load_gemmascope(path: str, k: Optional[int], layer: Optional[int]) -> SAE:
    """Gemma Scope's params.npz: W_enc (d_model, d_sae), W_dec (d_sae, d_model), b_enc, b_dec,
    threshold. JumpReLU as Gemma Scope defines it: pre = x @ W_enc + b_enc,
    acts = pre * (pre > threshold) (the thresholds are positive, so this is saehook's jumprelu);
    no b_dec subtraction; x_hat = acts @ W_dec + b_dec.

    W_enc is transposed into one float32 copy; W_dec stays mapped when the archive stores it
    uncompressed. At most k features per token are returned (default min(d_sae, 256)).
    """
    arrs = _npz_arrays(path)
    for low in ("w_enc", "w_dec"):  # some releases spell the matrices in lower case (as SAELens handles)
        if low in arrs and "W" + low[1:] not in arrs:
            arrs["W" + low[1:]] = arrs.pop(low)
    _need(arrs, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], path)
    d_model, d_sae = _matrix(arrs["W_enc"], "W_enc", "(d_model, d_sae)", path)
    _shape_check(path, {"W_dec": (arrs["W_dec"].shape, (d_sae, d_model)), "b_enc": (arrs["b_enc"].shape, (d_sae,)),
                        "b_dec": (arrs["b_dec"].shape, (d_model,)),
                        "threshold": (arrs["threshold"].shape, (d_sae,))})
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
