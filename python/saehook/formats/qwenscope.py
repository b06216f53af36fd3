"""Qwen-Scope: `layer{n}.sae.pt` files (torch.save of plain tensors)."""
from __future__ import annotations

import os
import re
import zipfile
from typing import Optional


from ..sae import SAE
from ._common import _LAYER_IN_NAME, SAEFormatError, _last_int, _make, _matrix, _need, _shape_check

_K_IN_PATH = re.compile(r"L0_(\d+)")                          # Qwen-Scope release: ...-L0_100
_QWEN_RELEASE = re.compile(r"SAE-Res-(.+?)-W\d+K")            # SAE-Res-Qwen3.5-9B-Base-W64K-...


def load_qwenscope(path: str, k: Optional[int], layer: Optional[int]) -> SAE:
    """`layer{n}.sae.pt`: a dict W_enc (d_sae, d_model), W_dec (d_model, d_sae), b_enc, b_dec.

    Encoding as the release's model card computes it: pre = x @ W_enc.T + b_enc, the k largest
    pre kept as they are (activation 'topk'); W_dec is used in place, column-major
    (dec_layout='cols'). The tensors are memory-mapped by torch.load and passed through.
    """
    try:
        import torch
    except ImportError:
        raise SAEFormatError(f"{path}: reading .pt files needs torch (pip install 'saehook[torch]')") from None
    try:
        # mmap=True maps the zip's tensor records instead of reading GBs; only the legacy
        # (pre-zipfile) torch.save format cannot be mapped.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError (non-tensor payloads), truncated zip, bad magic, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SAEFormatError(f"{path}: not a loadable tensor checkpoint with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {first})") from None
    if not isinstance(sd, dict):
        raise SAEFormatError(f"{path}: expected a dict of tensors, found a {type(sd).__name__}")
    names = ["W_enc", "W_dec", "b_enc", "b_dec"]
    _need(sd, names, path)
    for name in names:
        if not isinstance(sd[name], torch.Tensor):
            raise SAEFormatError(f"{path}: {name} is a {type(sd[name]).__name__}, not a tensor")
    d_sae, d_model = _matrix(sd["W_enc"], "W_enc", "(d_sae, d_model)", path)
    _shape_check(path, {"W_dec": (sd["W_dec"].shape, (d_model, d_sae)), "b_enc": (sd["b_enc"].shape, (d_sae,)),
                        "b_dec": (sd["b_dec"].shape, (d_model,))})
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
