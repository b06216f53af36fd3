"""Plain numpy (float64) reference implementations of saehook's semantics: the oracle the
compiled kernels are tested against."""
from __future__ import annotations

import numpy as np


def bf16_bits_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as the reference for saehook's converter."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def dense(arr: np.ndarray, tag: str, scales=None) -> np.ndarray:
    """Weights as float64 exactly as stored (bf16 bits / int8 x scale)."""
    if tag == "bf16":
        return bf16_bits_to_f32(arr).astype(np.float64)
    if tag == "int8":
        return arr.astype(np.float64) * np.asarray(scales, dtype=np.float64)[:, None]
    return arr.astype(np.float64)


def sae_dense(sae):
    """(W_enc (d_sae, d_model), W_dec (d_sae, d_model)) of an SAE in float64."""
    a = sae.arrays()
    W_enc = dense(a["W_enc"], sae.enc_dtype, a["enc_scales"])
    W_dec = dense(a["W_dec"], sae.dec_dtype)
    if sae.dec_layout == "cols":
        W_dec = W_dec.T
    return W_enc, W_dec


Q_BLOCK = 128  # int8 input quantization block of the avx512_vnni path


def kernel_operand(sae, x: np.ndarray, isa: str) -> np.ndarray:
    """The input rows as the given kernel path multiplies them (float64): exact for f32 paths,
    bf16-rounded rows (bf16 encoder, avx512_vnni and avx512_amx paths) and block-quantized int8
    rows (int8 encoder, the AMX, VNNI and AVX2 paths), reproducing their float32 arithmetic."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, sae.d_model)
    if sae.subtract_b_dec:
        x = x - sae.arrays()["b_dec"]
    rounds_bf16 = sae.enc_dtype == "bf16" and isa in ("avx512_vnni", "avx512_amx")
    quantizes_int8 = sae.enc_dtype == "int8" and isa in ("avx512_amx", "avx512_vnni", "avx512_vnni_int8", "avx2_vnni", "avx2")
    if not (rounds_bf16 or quantizes_int8):
        return x.astype(np.float64)
    if sae.enc_dtype == "bf16":
        return bf16_bits_to_f32(f32_to_bf16_bits(x)).astype(np.float64)
    out = np.zeros(x.shape, dtype=np.float64)
    for b0 in range(0, sae.d_model, Q_BLOCK):
        blk = x[:, b0:b0 + Q_BLOCK]
        amax = np.abs(blk).max(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q = np.clip(np.rint(blk * inv), -127, 127)
        out[:, b0:b0 + Q_BLOCK] = q * (amax / np.float32(127)).astype(np.float32)
    return out


def preacts(sae, x: np.ndarray, isa: str = None) -> np.ndarray:
    import saehook

    a = sae.arrays()
    W_enc, _ = sae_dense(sae)
    x = kernel_operand(sae, x, isa or saehook.get_isa())
    pre = x @ W_enc.T
    if a["b_enc"] is not None:
        pre = pre + a["b_enc"]
    return pre


def activate(sae, pre: np.ndarray) -> np.ndarray:
    """Dense activations before the Top-K cap (NaN marks 'not a candidate')."""
    act = pre.copy()
    if sae.activation in ("topk_relu", "relu"):
        act[~(pre > 0)] = np.nan
    elif sae.activation == "jumprelu":
        th = sae.arrays()["threshold"]
        act[~((pre > th) & (pre > 0))] = np.nan
    return act


def encode(sae, x: np.ndarray, k: int):
    """(values, indices) per row: k best candidates by value desc, ties lower index; padding
    (0, -1) where fewer than k candidates exist."""
    act = activate(sae, preacts(sae, x))
    n, m = act.shape
    vals = np.zeros((n, k))
    idx = np.full((n, k), -1, dtype=np.int64)
    for r in range(n):
        cand = np.flatnonzero(~np.isnan(act[r]))
        order = cand[np.lexsort((cand, -act[r, cand]))][:k]
        vals[r, : len(order)] = act[r, order]
        idx[r, : len(order)] = order
    return vals, idx


def decode(sae, values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    _, W_dec = sae_dense(sae)
    b_dec = sae.arrays()["b_dec"]
    out = np.zeros((values.shape[0], sae.d_model))
    for r in range(values.shape[0]):
        for v, f in zip(values[r], indices[r]):
            if f >= 0:
                out[r] += v * W_dec[f]
    if b_dec is not None:
        out += b_dec
    return out


def steer(sae, h: np.ndarray, ops, k=None) -> np.ndarray:
    """ops: list of (op, feature, value, normalize) applied with one encode of the input."""
    _, W_dec = sae_dense(sae)
    h = np.asarray(h, dtype=np.float64).reshape(-1, sae.d_model)
    vals, idx = encode(sae, h, k or sae.k)
    out = h.copy()
    for r in range(h.shape[0]):
        z = dict(zip(idx[r].tolist(), vals[r].tolist()))
        for op, f, value, normalize in ops:
            d = W_dec[f] / np.linalg.norm(W_dec[f]) if normalize else W_dec[f]
            zf = z.get(f, 0.0)
            c = {"add": value, "clamp": value - zf, "scale": (value - 1) * zf, "ablate": -zf}[op]
            out[r] += c * d
    return out


def assert_topk_matches(vals, idx, ref_pre_act, k, tol):
    """Robust comparison against the reference that tolerates near-ties at the k-th boundary:
    our values equal the reference activations at our indices, the order is right, and no
    excluded candidate beats an included one by more than tol."""
    vals = np.asarray(vals, dtype=np.float64).reshape(-1, k)
    idx = np.asarray(idx).reshape(-1, k)
    for r in range(idx.shape[0]):
        act = ref_pre_act[r]
        cand = np.flatnonzero(~np.isnan(act))
        n_real = min(k, len(cand))
        assert (idx[r, n_real:] == -1).all() and (vals[r, n_real:] == 0).all(), f"row {r}: padding wrong"
        chosen = idx[r, :n_real]
        assert (chosen >= 0).all(), f"row {r}: missing entries"
        assert len(set(chosen.tolist())) == n_real, f"row {r}: duplicate indices"
        np.testing.assert_allclose(vals[r, :n_real], act[chosen], rtol=tol, atol=tol)
        assert np.all(np.diff(vals[r, :n_real]) <= 0), f"row {r}: not sorted"
        if n_real < len(cand):
            excluded = np.setdiff1d(cand, chosen)
            assert act[excluded].max() <= act[chosen].min() + tol * max(1.0, abs(act[chosen].min())), f"row {r}: wrong selection"
