"""saehook's own format: one memory-mappable .safetensors file with saehook metadata."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from .._arrays import aligned_copy
from ..sae import ACTIVATIONS, DEC_LAYOUTS, SAE, register_file_writer
from . import _files
from . import safetensors_io as st
from ._common import SAEFormatError, _make, _matrix, _need, _read_safetensors, _shape_check

FORMAT_VERSION = "1"


# __metadata__ (all strings): format="saehook", format_version, activation, k, subtract_b_dec
# ("true"/"false"), dec_layout, hook_point, model, layer ("" when unknown), and info: a JSON
# object with the rest of SAE.metadata. Tensors: W_enc (f32/f16/bf16/int8, (d_sae, d_model)),
# enc_scales (f32 (d_sae,), int8 encoders only), W_dec (f32/f16/bf16, rows or cols), and
# optionally b_enc (f32 (d_sae,)), b_dec (f32 (d_model,)), threshold (f32 (d_sae,)).
# The biases are optional in this format (an SAE may have none), so any other tensor name is
# refused: a misspelt "b_enc" must not load as an SAE without its bias.
_VECTORS = ("enc_scales", "b_enc", "b_dec", "threshold")
_KNOWN = ("W_enc", "W_dec") + _VECTORS


def load_saehook(path: str, k: Optional[int], layer: Optional[int]) -> SAE:
    tensors, dtypes, meta = _read_safetensors(path)
    if meta.get("format") != "saehook":
        hint = ""
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.exists(os.path.join(parent, "cfg.json")):
            hint = f"; SAELens and sparsify SAEs load from their directory: saehook.load({parent!r})"
        raise SAEFormatError(f"{path}: a .safetensors file without saehook metadata{hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SAEFormatError(f"{path}: saehook format version {meta.get('format_version')!r} is not supported "
                             f"(this saehook reads version {FORMAT_VERSION})")
    activation, dec_layout = meta.get("activation"), meta.get("dec_layout", "rows")
    if activation not in ACTIVATIONS or dec_layout not in DEC_LAYOUTS:
        raise SAEFormatError(f"{path}: bad metadata activation={activation!r} dec_layout={dec_layout!r}")
    subtract = meta.get("subtract_b_dec", "false")
    if subtract not in ("true", "false"):
        raise SAEFormatError(f"{path}: bad metadata subtract_b_dec={subtract!r} (expected 'true' or 'false')")
    try:
        k = k or int(meta["k"])
        info = _files.loads_strict(meta.get("info") or "{}")
        saved_layer = int(meta["layer"]) if meta.get("layer") else None
    except (KeyError, ValueError) as e:
        raise SAEFormatError(f"{path}: bad or missing metadata ({type(e).__name__}: {e})") from None
    int8 = dtypes.get("W_enc") == "I8"
    _need(tensors, ["W_enc", "W_dec"] + (["enc_scales"] if int8 else []), path)
    unknown = sorted(set(tensors) - set(_KNOWN))
    if unknown:
        raise SAEFormatError(f"{path}: unexpected tensor(s) {', '.join(map(repr, unknown))}; saehook files hold "
                             f"only {', '.join(_KNOWN)} (a misspelt name would silently drop that tensor)")
    if "enc_scales" in tensors and not int8:
        raise SAEFormatError(f"{path}: enc_scales goes with an int8 W_enc, but W_enc is {dtypes['W_enc']}")
    etag, dtag = st.tag_of(dtypes["W_enc"]), st.tag_of(dtypes["W_dec"])
    if etag is None or dtag is None:
        raise SAEFormatError(f"{path}: unsupported weight dtypes W_enc {dtypes['W_enc']}, W_dec {dtypes['W_dec']}")
    d_sae, d_model = _matrix(tensors["W_enc"], "W_enc", "(d_sae, d_model)", path)
    lengths = {"enc_scales": d_sae, "b_enc": d_sae, "b_dec": d_model, "threshold": d_sae}
    _shape_check(path, {n: (tensors[n].shape, (lengths[n],)) for n in _VECTORS if n in tensors})
    wrong = [f"{n} is {dtypes[n]}" for n in _VECTORS if n in tensors and dtypes[n] != "F32"]
    if wrong:
        raise SAEFormatError(f"{path}: {'; '.join(wrong)}; saehook stores vectors as F32")
    out_meta = dict(info) if isinstance(info, dict) else {}
    out_meta.update({"format": "saehook", "source": path, "layer": layer if layer is not None else saved_layer,
                     "hook_point": meta.get("hook_point") or None, "model": meta.get("model") or None})
    return _make(path, lambda: SAE(
        tensors["W_enc"], tensors["W_dec"], tensors.get("b_enc"), tensors.get("b_dec"), k=k,
        activation=activation, subtract_b_dec=subtract == "true",
        threshold=tensors.get("threshold"), dec_layout=dec_layout, enc_scales=tensors.get("enc_scales"),
        enc_dtype=etag, dec_dtype=dtag, metadata=out_meta))


def save_saehook(sae: SAE, path: Any, *, dec_layout: str = "rows") -> None:
    """Writes `sae` in saehook's format: one .safetensors file that loads memory-mapped.

    dec_layout='rows' stores W_dec feature-major (transposing a column-major decoder such as
    Qwen-Scope's), the fast layout for decode. Written atomically (temp file + os.replace).
    """
    if dec_layout not in DEC_LAYOUTS:
        raise ValueError(f"dec_layout must be 'rows' or 'cols', got {dec_layout!r}")
    a = sae.arrays()
    W_dec = a["W_dec"] if sae.dec_layout == dec_layout else aligned_copy(a["W_dec"].T)
    tensors = {"W_enc": (a["W_enc"], sae.enc_dtype), "W_dec": (W_dec, sae.dec_dtype)}
    for name in ("enc_scales", "b_enc", "b_dec", "threshold"):
        if a[name] is not None:
            tensors[name] = (a[name], "f32")
    reserved = {"format", "source", "layer", "hook_point", "model", "mapped"}  # mapped: of the loaded copy
    info = {key: val for key, val in sae.metadata.items()
            if key not in reserved and isinstance(val, (str, int, float, bool, type(None)))}
    meta = {"format": "saehook", "format_version": FORMAT_VERSION, "activation": sae.activation, "k": str(sae.k),
            "subtract_b_dec": "true" if sae.subtract_b_dec else "false", "dec_layout": dec_layout,
            "hook_point": str(sae.hook_point or ""), "model": str(sae.metadata.get("model") or ""),
            "layer": "" if sae.layer is None else str(sae.layer), "info": json.dumps(info)}
    st.write(os.fspath(path), tensors, meta)


register_file_writer(save_saehook)
