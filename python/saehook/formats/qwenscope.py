"""Qwen-Scope: `layer{n}.sae.pt` files (torch.save of plain tensors)."""
from __future__ import annotations

import os
import re
import zipfile
from typing import Optional

from ..sae import SAE
from . import _files
from ._common import (
    _LAYER_IN_NAME, SAEFormatError, _last_int, _make, _matrix, _need, _require_regular, _shape_check, _zip_entries,
)

_K_IN_PATH = re.compile(r"L0_(\d+)")                          # Qwen-Scope release: ...-L0_100
_QWEN_RELEASE = re.compile(r"SAE-Res-(.+?)-W\d+K")            # SAE-Res-Qwen3.5-9B-Base-W64K-...


def load_qwenscope(path: str, k: Optional[int], layer: Optional[int]) -> SAE:
    """`layer{n}.sae.pt`: a dict W_enc (d_sae, d_model), W_dec (d_model, d_sae), b_enc, b_dec.

    Encoding as the release's model card computes it: pre = x @ W_enc.T + b_enc, the k largest
    pre kept as they are (activation 'topk'); W_dec is used in place, column-major
    (dec_layout='cols'). The tensors are memory-mapped by torch.load and passed through, after
    checking what torch.load(mmap=True) does not (_records_match, _check_dense) and before any
    data is read. The release always writes all four tensors: a missing one is an error.
    """
    try:
        import torch
    except ImportError:
        raise SAEFormatError(f"{path}: reading .pt files needs torch (pip install 'saehook[torch]')") from None
    _require_regular(path)
    zipped = zipfile.is_zipfile(path)
    entries = _zip_entries(path) if zipped else None
    names = ["W_enc", "W_dec", "b_enc", "b_dec"]
    # mmap=True maps the zip's tensor records instead of reading GBs (no data is read here);
    # only the legacy (pre-zipfile) torch.save format cannot be mapped.
    sd = _torch_load(torch, path, map_location="cpu", mmap=zipped)
    _check_dict(torch, sd, names, path)
    d_sae, d_model = _matrix(sd["W_enc"], "W_enc", "(d_sae, d_model)", path)
    _shape_check(path, {"W_dec": (sd["W_dec"].shape, (d_model, d_sae)), "b_enc": (sd["b_enc"].shape, (d_sae,)),
                        "b_dec": (sd["b_dec"].shape, (d_model,))})
    if zipped and not _records_match(torch, sd, names, path, entries):
        # No /proc/self/maps to locate the mapped storages: read instead; torch.load without
        # mmap compares every record's size with the size the pickle declares.
        sd = _torch_load(torch, path, map_location="cpu")
        _check_dict(torch, sd, names, path)
    _check_dense(sd, names, path)
    full = os.path.abspath(path)
    if k is None:
        k = _last_int(_K_IN_PATH, full)
        if k is None:
            raise SAEFormatError(f"{path}: Qwen-Scope files do not store k and the path names no release "
                                 f"(…-L0_<k>); pass k= (e.g. SAE-Res-Qwen3.5-9B-Base-W64K-L0_100 means k=100)")
    if layer is None:
        layer = _last_int(_LAYER_IN_NAME, os.path.basename(path))
    meta = {"format": "qwen-scope", "layer": layer, "hook_point": "resid_post", "source": path}
    releases = _QWEN_RELEASE.findall(full)  # also inside a Hugging Face cache path (models--Qwen--SAE-Res-...)
    if releases:
        meta["model"] = releases[-1]
    return _make(path, lambda: SAE(sd["W_enc"], sd["W_dec"], sd["b_enc"], sd["b_dec"], k=k, activation="topk",
                                   dec_layout="cols", metadata=meta))


def _torch_load(torch, path: str, **kwargs):
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except Exception as e:  # UnpicklingError (non-tensor payloads), truncated zip, bad magic, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SAEFormatError(f"{path}: not a loadable tensor checkpoint with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {first})") from None


def _check_dict(torch, sd, names, path: str) -> None:
    if not isinstance(sd, dict):
        raise SAEFormatError(f"{path}: expected a dict of tensors, found a {type(sd).__name__}")
    _need(sd, names, path)
    for name in names:
        if not isinstance(sd[name], torch.Tensor):
            raise SAEFormatError(f"{path}: {name} is a {type(sd[name]).__name__}, not a tensor")


def _check_dense(sd, names, path: str) -> None:
    """Each tensor's elements are distinct memory and inside its storage: an expanded (stride-0)
    tensor from a 3 KB file would otherwise become a GB-sized copy when the SAE takes it."""
    for name in names:
        t = sd[name]
        if t.numel() and not _dense(tuple(t.shape), tuple(t.stride())):
            raise SAEFormatError(f"{path}: {name} has shape {tuple(t.shape)} with strides {tuple(t.stride())}: "
                                 f"its elements overlap (an expanded tensor); torch.save a contiguous copy")
        end = (t.storage_offset() + t.numel()) * t.element_size()
        if end > t.untyped_storage().nbytes():
            raise SAEFormatError(f"{path}: {name} needs {end} bytes but its storage has {t.untyped_storage().nbytes()}")


def _records_match(torch, sd, names, path: str, entries) -> bool:
    """Each mapped storage is a stored (uncompressed) data record of exactly the byte size the
    pickle declares. torch.load(mmap=True) maps `declared` bytes from the record's start without
    comparing: a shortened record would hand out its neighbour's bytes as weights. Nothing has
    read the data yet. False where the mapping cannot be located (no /proc/self/maps)."""
    by_offset = {e.data_offset: e for e in entries.values()}
    real = os.path.realpath(path)
    for name in names:
        storage = sd[name].untyped_storage()
        if storage.nbytes() == 0:
            continue
        try:
            where = _files.file_offset(storage.data_ptr())
        except OSError:
            return False
        record = by_offset.get(where[1]) if where and os.path.realpath(where[0]) == real else None
        if record is None or "/data/" not in record.info.filename:
            raise SAEFormatError(f"{path}: {name}'s storage does not start at a data record of the archive "
                                 f"(a record is shorter or longer than the pickle declares, or the file changed "
                                 f"while it was loaded)")
        if record.info.compress_type != zipfile.ZIP_STORED:
            raise SAEFormatError(f"{path}: record {record.info.filename} is compressed; torch.save stores data "
                                 f"records uncompressed (they are memory-mapped)")
        if record.info.file_size != storage.nbytes():
            raise SAEFormatError(f"{path}: {name} declares a {storage.nbytes()}-byte storage but its record "
                                 f"{record.info.filename} holds {record.info.file_size} bytes")
    return True


def _dense(shape, stride) -> bool:
    """True when no two elements share memory and they fill one block (contiguous up to a
    permutation of the dimensions, as a transposed tensor is)."""
    expected = 1
    for size, step in sorted(((n, s) for n, s in zip(shape, stride) if n != 1), key=lambda d: d[1]):
        if step != expected:
            return False
        expected *= size
    return True
