"""Helpers of tests/test_formats.py: SAE files written the way each format's own tooling writes
them, each format's encode/decode transcribed from its own code (torch, float32 like theirs),
and checks that do not depend on how near-ties are broken."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np
import torch
from safetensors.torch import save_file, save_model


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + sum(shape))
    return torch.randn(*shape, generator=g)


# ---------------- writers ----------------
def qwen_state(d_model: int, d_sae: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A Qwen-Scope layer file's dict (the release's shapes: W_dec is (d_model, d_sae))."""
    return {"W_enc": randn(d_sae, d_model, seed=seed), "W_dec": randn(d_model, d_sae, seed=seed + 1),
            "b_enc": randn(d_sae, seed=seed + 2), "b_dec": randn(d_model, seed=seed + 3)}


def write_saelens(folder, tensors: Dict[str, torch.Tensor], arch: str, *, style: str = "v6", **fields) -> dict:
    """cfg.json + sae_weights.safetensors as SAELens writes them.

    style='v6': SAEConfig.to_dict() of SAELens >= 6 (hook and model names under "metadata").
    style='pre6': the flat config of SAELens 3-5 (hook_point, activation_fn_str/kwargs, no
    architecture for standard SAEs, no apply_b_dec_to_input: SAELens defaults both)."""
    os.makedirs(folder, exist_ok=True)
    d_in, d_sae = tensors["W_enc"].shape
    if style == "v6":
        cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "reshape_activations": "none",
               "metadata": {"sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1",
                            "model_name": "tiny-model", "hook_name": "blocks.5.hook_resid_post",
                            "hook_head_index": None, "prepend_bos": True, "context_size": 128},
               "architecture": arch}
        if arch == "topk":
            cfg.update(k=6, rescale_acts_by_decoder_norm=False)
    else:
        cfg = {"model_name": "tiny-model", "hook_point": "blocks.5.hook_resid_post", "hook_point_layer": 5,
               "hook_point_head_index": None, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
               "activation_fn_str": "relu", "finetuning_scaling_factor": False,
               "normalize_activations": "none", "context_size": 128, "prepend_bos": True,
               "sae_lens_training_version": "3.13.0"}
        if arch == "topk":
            cfg.update(activation_fn_str="topk", activation_fn_kwargs={"k": 6})
        elif arch != "standard":
            cfg["architecture"] = arch
    cfg.update(fields)
    save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(folder, "sae_weights.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return cfg


class SparseCoderLike(torch.nn.Module):
    """The parameters of sparsify's SparseCoder under its names (encoder = nn.Linear)."""

    def __init__(self, d_in: int, num_latents: int, seed: int = 0, dtype=torch.float32):
        super().__init__()
        self.encoder = torch.nn.Linear(d_in, num_latents, dtype=dtype)
        with torch.no_grad():
            self.encoder.weight.copy_(randn(num_latents, d_in, seed=seed))
            self.encoder.bias.copy_(0.3 * randn(num_latents, seed=seed + 1))
        self.W_dec = torch.nn.Parameter(randn(num_latents, d_in, seed=seed + 2).to(dtype))
        self.b_dec = torch.nn.Parameter(randn(d_in, seed=seed + 3).to(dtype))


def write_sparsify(folder, coder: SparseCoderLike, k: int, **fields) -> None:
    """SparseCoder.save_to_disk: save_model + cfg.json = {**cfg.to_dict(), "d_in": d_in}."""
    os.makedirs(folder, exist_ok=True)
    d_sae, d_in = coder.encoder.weight.shape
    save_model(coder, os.path.join(folder, "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": d_sae, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in}
    cfg.update(fields)
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)


# ---------------- each format's own forward pass ----------------
def saelens_forward(x: torch.Tensor, t: Dict[str, torch.Tensor], arch: str, k: int = 0, *,
                    apply_b_dec_to_input: bool = True, rescale: bool = False):
    """(hidden_pre as ranked, feature_acts, sae_out) transcribed from sae_lens/saes/*.py."""
    sae_in = x - t["b_dec"] * apply_b_dec_to_input
    hidden_pre = sae_in @ t["W_enc"] + t["b_enc"]
    if arch == "topk":
        if rescale:
            hidden_pre = hidden_pre * t["W_dec"].norm(dim=-1)
        v, i = torch.topk(hidden_pre, k=k, dim=-1, sorted=False)
        acts = torch.zeros_like(hidden_pre).scatter(-1, i, v.relu())
    elif arch == "jumprelu":
        acts = torch.relu(hidden_pre) * (hidden_pre > t["threshold"])
    else:
        acts = torch.relu(hidden_pre)
    dec_in = acts / t["W_dec"].norm(dim=-1) if rescale else acts
    return hidden_pre, acts, dec_in @ t["W_dec"] + t["b_dec"]


def sparsify_forward(x: torch.Tensor, coder: SparseCoderLike, k: int):
    """(pre-activations before the ReLU, sae_out): SparseCoder.encode (x - b_dec, then
    fused_encoder: relu(linear), topk) and decode (top_acts on rows of W_dec, + b_dec)."""
    with torch.no_grad():
        raw = torch.nn.functional.linear(x - coder.b_dec, coder.encoder.weight, coder.encoder.bias)
        top_acts, top_indices = torch.topk(torch.relu(raw), k, dim=-1, sorted=False)
        out = torch.zeros_like(raw).scatter(-1, top_indices, top_acts) @ coder.W_dec + coder.b_dec
    return raw, out


# ---------------- checks ----------------
def check_selection(vals, idx, ranking, k: int, threshold=None, tol: float = 2e-4) -> None:
    """Our (vals, idx) of each row are a valid outcome of the format's definition: every
    feature we return is eligible (ranking > threshold; all features when threshold is None)
    with value = ranking; no unreturned eligible feature ranks above a returned one by more
    than tol (so near-ties may go either way); as many as min(k, eligible), up to near-ties at
    the threshold; padding is index -1 with value 0."""
    vals, idx, ranking = np.asarray(vals), np.asarray(idx), np.asarray(ranking, dtype=np.float64)
    scale = tol * max(1.0, float(np.abs(ranking).max()))
    thr = np.full(ranking.shape[-1], -np.inf) if threshold is None else np.broadcast_to(
        np.asarray(threshold, dtype=np.float64), ranking.shape[-1:])
    for r in range(ranking.shape[0]):
        valid = idx[r] >= 0
        sel, v = idx[r][valid].astype(np.int64), vals[r][valid].astype(np.float64)
        assert np.all(vals[r][~valid] == 0), f"row {r}: padding with nonzero values"
        assert len(set(sel.tolist())) == len(sel), f"row {r}: a feature returned twice"
        loose, strict = ranking[r] > thr - scale, ranking[r] > thr + scale
        assert np.all(loose[sel]), f"row {r}: returned ineligible features {sel[~loose[sel]]}"
        assert min(k, strict.sum()) <= len(sel) <= min(k, loose.sum()), f"row {r}: {len(sel)} features returned"
        np.testing.assert_allclose(v, ranking[r][sel], rtol=0, atol=scale, err_msg=f"row {r}: values")
        if len(sel):
            rest = np.setdiff1d(np.flatnonzero(loose), sel)
            assert np.all(ranking[r][rest] <= ranking[r][sel].min() + scale), f"row {r}: a larger feature was skipped"


def decode_rows(vals, idx, W_dec_rows, b_dec) -> np.ndarray:
    """sum_j vals_j * W_dec_rows[idx_j] + b_dec in float64 (index -1 = padding)."""
    vals, idx = np.asarray(vals, dtype=np.float64), np.asarray(idx)
    W = np.asarray(W_dec_rows, dtype=np.float64)
    out = np.einsum("nk,nkd->nd", np.where(idx >= 0, vals, 0.0), W[np.where(idx >= 0, idx, 0)])
    return out + np.asarray(b_dec, dtype=np.float64)


def mapped_file(obj) -> Optional[str]:
    """The file whose memory mapping holds obj's data (numpy array or torch tensor), or None
    when the data lives in anonymous memory (a copy). Linux: /proc/self/maps."""
    addr = obj.data_ptr() if isinstance(obj, torch.Tensor) else obj.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            if lo <= addr < hi:
                name = parts[5].strip() if len(parts) == 6 else ""
                return os.path.realpath(name) if name.startswith("/") else None
    return None
