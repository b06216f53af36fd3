"""SAELens: a folder with cfg.json and sae_weights.safetensors."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ..sae import SAE
from . import safetensors_io as st
from ._common import (
    DEFAULT_CAP, _LAYER_IN_HOOK, SAEFormatError, _cfg_bool, _cfg_int, _f32, _last_int, _make, _matrix, _need,
    _read_cfg, _read_safetensors, _shape_check,
)

_SAELENS_ACTIVATIONS = {"standard": "relu", "topk": "topk_relu", "jumprelu": "jumprelu"}


def load_saelens(folder: str, k: Optional[int], layer: Optional[int]) -> SAE:
    """A SAELens folder: cfg.json + sae_weights.safetensors with W_enc (d_in, d_sae),
    W_dec (d_sae, d_in), b_enc, b_dec (and threshold for jumprelu).

    As SAELens's inference SAEs (sae_lens/saes/*.py) compute it:
        pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc
        standard: relu(pre); jumprelu: relu(pre) * (pre > threshold);
        topk: the k largest pre, then relu; x_hat = acts @ W_dec + b_dec.
    Configs written before SAELens 6.0 get SAELens's own defaults (handle_pre_6_0_config):
    apply_b_dec_to_input=True, hook_point -> hook_name, activation_fn 'topk' -> architecture topk.

    Memory: W_enc is stored input-major and the kernels need it feature-major, so it is
    transposed into one owned copy; W_dec, stored (d_sae, d_in), stays a mapped view
    (dec_layout='rows'). relu/jumprelu SAEs return at most k features per token
    (default min(d_sae, 256)). Options saehook does not compute exactly are refused.
    """
    cfg = _read_cfg(folder)
    cfg_path = os.path.join(folder, "cfg.json")
    wpath = os.path.join(folder, "sae_weights.safetensors")
    tensors, dtypes, _ = _read_safetensors(wpath)
    meta_cfg = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}

    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    cfg_k = _cfg_int(cfg, "k", cfg_path)
    fn_kwargs = cfg.get("activation_fn_kwargs") or {}
    if act_fn == "topk" and isinstance(fn_kwargs, dict) and fn_kwargs.get("k") is not None:
        arch, cfg_k = "topk", _cfg_int(fn_kwargs, "k", f"{cfg_path}: activation_fn_kwargs")  # pre-6.0 TopK SAEs
    elif act_fn not in (None, "relu"):
        raise SAEFormatError(f"{folder}: activation_fn={act_fn!r} is not supported (SAELens's ReLU and TopK are)")
    if arch not in _SAELENS_ACTIVATIONS:
        raise SAEFormatError(f"{folder}: SAELens architecture {arch!r} is not supported "
                             f"(supported: {', '.join(sorted(_SAELENS_ACTIVATIONS))})")
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:  # pre-6.0 configs stored a boolean
        norm = "expected_average_only_in" if norm else "none"
    if norm != "none":
        raise SAEFormatError(f"{folder}: normalize_activations={norm!r} is not supported: saehook does not "
                             f"rescale its inputs; only SAEs trained on raw activations ('none') load")
    if "scaling_factor" in tensors and not np.all(_f32(tensors["scaling_factor"], dtypes["scaling_factor"]) == 1):
        raise SAEFormatError(f"{wpath}: a finetuning scaling_factor other than 1 is not supported")

    need = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    _need(tensors, need, wpath)
    d_in, d_sae = _matrix(tensors["W_enc"], "W_enc", "(d_in, d_sae)", wpath)
    shapes = {"W_dec": (tensors["W_dec"].shape, (d_sae, d_in)), "b_enc": (tensors["b_enc"].shape, (d_sae,)),
              "b_dec": (tensors["b_dec"].shape, (d_in,))}
    if arch == "jumprelu":
        shapes["threshold"] = (tensors["threshold"].shape, (d_sae,))
    _shape_check(wpath, shapes)
    for key, actual in (("d_in", d_in), ("d_sae", d_sae)):
        if _cfg_int(cfg, key, cfg_path) not in (None, actual):
            raise SAEFormatError(f"{folder}: cfg.json says {key}={cfg[key]} but {wpath} has {actual}")

    if arch == "topk":
        k = k or (cfg_k if cfg_k is not None else 100)  # 100: TopKSAEConfig's default
    else:
        k = k or min(d_sae, DEFAULT_CAP)
    hook = meta_cfg.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if hook is not None and not isinstance(hook, str):
        raise SAEFormatError(f"{cfg_path}: hook_name must be a string, got {hook!r}")
    if layer is None:
        layer = _last_int(_LAYER_IN_HOOK, hook)
    meta = {"format": "saelens", "hook_point": hook, "layer": layer, "source": folder,
            "model": meta_cfg.get("model_name") or cfg.get("model_name")}
    if cfg.get("reshape_activations") == "hook_z" or (hook or "").endswith("hook_z"):
        meta["input"] = "hook_z flattened: (..., n_heads * d_head)"

    W_enc = np.ascontiguousarray(tensors["W_enc"].T)  # the one copy: feature-major for the kernels
    W_dec, b_enc = tensors["W_dec"], _f32(tensors["b_enc"], dtypes["b_enc"])
    etag, dtag = st.tag_of(dtypes["W_enc"]), st.tag_of(dtypes["W_dec"])
    subtract_b_dec = _cfg_bool(cfg, "apply_b_dec_to_input", True, cfg_path)
    if arch == "topk" and _cfg_bool(cfg, "rescale_acts_by_decoder_norm", False, cfg_path):
        folded = _fold_decoder_norms(W_enc, dtypes["W_enc"], b_enc, W_dec, dtypes["W_dec"])
        if folded is not None:
            (W_enc, b_enc, W_dec), etag, dtag = folded, "f32", "f32"
    return _make(folder, lambda: SAE(
        W_enc, W_dec, b_enc, _f32(tensors["b_dec"], dtypes["b_dec"]), k=k, activation=_SAELENS_ACTIVATIONS[arch],
        subtract_b_dec=subtract_b_dec,
        threshold=_f32(tensors["threshold"], dtypes["threshold"]) if arch == "jumprelu" else None,
        dec_layout="rows", enc_dtype=etag, dec_dtype=dtag, metadata=meta))


def _fold_decoder_norms(W_enc, enc_st: str, b_enc, W_dec, dec_st: str):
    """SAELens TopK with rescale_acts_by_decoder_norm ranks pre * |d_f| and decodes
    acts / |d_f|: the same SAE as W_enc_f * |d_f|, b_enc_f * |d_f|, d_f / |d_f| (SAELens's own
    _fold_norm_topk), returned as float32 copies. SAELens folds this when it saves an inference
    SAE, so the norms are usually 1 already: within 1e-6 (below the float32 accuracy of the
    result) this returns None and W_dec stays mapped."""
    W_dec = _f32(W_dec, dec_st)
    norms = np.linalg.norm(W_dec.astype(np.float64), axis=1)
    if np.all(np.abs(norms - 1) <= 1e-6):
        return None
    # A zero decoder row: SAELens would divide 0 by 0; as the limit, the feature never fires.
    safe = np.where(norms > 0, norms, 1.0)
    return ((_f32(W_enc, enc_st) * norms[:, None]).astype(np.float32), (b_enc * norms).astype(np.float32),
            (W_dec / safe[:, None]).astype(np.float32))
