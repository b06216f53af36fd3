"""EleutherAI sparsify: a folder per hook point with cfg.json and sae.safetensors."""
from __future__ import annotations

import os
from typing import Optional


from ..sae import SAE
from . import safetensors_io as st
from ._common import (
    _LAYER_IN_HOOK, SPARSIFY_BOOL_STRINGS, SAEFormatError, _cfg_bool, _cfg_int, _f32, _last_int, _make, _matrix, _need, _read_cfg,
    _read_json, _read_safetensors, _shape_check,
)

def load_sparsify(folder: str, k: Optional[int], layer: Optional[int]) -> SAE:
    """A sparsify folder (one per hook point): cfg.json + sae.safetensors with encoder.weight
    (d_sae, d_in), encoder.bias, W_dec (d_sae, d_in), b_dec.

    As sparsify's SparseCoder.encode / fused_encoder compute it: relu((x - b_dec) @ W.T + b),
    then the k largest (activation 'topk_relu', subtract_b_dec); x_hat = acts @ W_dec + b_dec.
    Both matrices are already feature-major: zero copy. Transcoders, skip connections and the
    groupmax / signed / PKM variants compute something else and are refused.
    """
    cfg = _read_cfg(folder)
    cfg_path = os.path.join(folder, "cfg.json")
    wpath = os.path.join(folder, "sae.safetensors")
    tensors, dtypes, _ = _read_safetensors(wpath)
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{folder}: sparsify activation {cfg['activation']!r} is not supported; only 'topk'")
    for flag, what in (("transcode", "transcoders (they predict another hook point)"),
                       ("skip_connection", "skip connections (W_skip)"), ("signed", "signed SAEs"),
                       ("encoder_pkm", "product-key-memory encoders"), ("encoder_halut", "lookup-table encoders")):
        if _cfg_bool(cfg, flag, False, cfg_path, strings=SPARSIFY_BOOL_STRINGS):
            raise SAEFormatError(f"{folder}: sparsify {what} are not supported ({flag}=true)")
    _need(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], wpath)
    d_sae, d_in = _matrix(tensors["encoder.weight"], "encoder.weight", "(d_sae, d_in)", wpath)
    _shape_check(wpath, {"W_dec": (tensors["W_dec"].shape, (d_sae, d_in)),
                         "encoder.bias": (tensors["encoder.bias"].shape, (d_sae,)),
                         "b_dec": (tensors["b_dec"].shape, (d_in,))})
    if _cfg_int(cfg, "d_in", cfg_path, strings=True) not in (None, d_in):
        raise SAEFormatError(f"{folder}: cfg.json says d_in={cfg['d_in']} but {wpath} has {d_in}")
    # sparsify: num_latents, or d_in * expansion_factor when num_latents is 0.
    expansion = _cfg_int(cfg, "expansion_factor", cfg_path, strings=True)
    want_latents = _cfg_int(cfg, "num_latents", cfg_path, strings=True) or (d_in * expansion if expansion is not None else d_sae)
    if want_latents != d_sae:
        raise SAEFormatError(f"{folder}: cfg.json implies {want_latents} latents but {wpath} has {d_sae}")
    k = k or _cfg_int(cfg, "k", cfg_path, default=32, strings=True)  # 32: SparseCoderConfig's default
    hook = os.path.basename(os.path.abspath(folder))  # sparsify names each folder after its hook point
    meta = {"format": "sparsify", "hook_point": hook, "source": folder,
            "layer": layer if layer is not None else _last_int(_LAYER_IN_HOOK, hook)}
    model = _run_config(folder).get("model")
    if model:
        meta["model"] = model
    return _make(folder, lambda: SAE(
        tensors["encoder.weight"], tensors["W_dec"], _f32(tensors["encoder.bias"], dtypes["encoder.bias"]),
        _f32(tensors["b_dec"], dtypes["b_dec"]), k=k, activation="topk_relu", subtract_b_dec=True,
        dec_layout="rows", enc_dtype=st.tag_of(dtypes["encoder.weight"]), dec_dtype=st.tag_of(dtypes["W_dec"]),
        metadata=meta))


def _run_config(folder: str) -> dict:
    """sparsify's training run writes config.json (with the model name) next to the folders.
    Optional: a missing one is skipped; one that is there is read as strictly as cfg.json (a
    FIFO there is refused rather than waited on)."""
    path = os.path.join(os.path.dirname(os.path.abspath(folder)), "config.json")
    if not os.path.lexists(path):
        return {}
    cfg = _read_json(path)
    return cfg if isinstance(cfg, dict) else {}
