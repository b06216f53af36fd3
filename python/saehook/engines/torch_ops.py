"""torch custom ops over the compiled kernels (torch.library), so SAE calls can sit inside
models traced by torch.compile.

    import saehook.torch_ops as ops
    vals, idx = ops.encode(sae, x)          # torch.ops.saehook.encode
    x_hat = ops.decode(sae, vals, idx)      # torch.ops.saehook.decode
    ops.steer_(steering, h)                 # torch.ops.saehook.steer_ (in place)

The ops take the SAE by its handle (an int), which torch.compile treats as a constant; the
SAE object must stay alive while a compiled graph that uses it runs. CUDA tensors run on
saehook's CUDA kernels (saehook.cuda) on torch's current stream, with the SAE's weights copied to
that device on first use. `encode` is
differentiable with respect to x: the gradient of each kept value is its encoder row
(d value_j / dx = W_enc[idx_j]), the Top-K selection itself being piecewise constant. `decode`
is differentiable with respect to the values (d x_hat / d value_j = W_dec[idx_j]; the indices
get none), so a reconstruction loss backpropagates through decode(encode(x)) to x. `steer_` has
no gradient and refuses a tensor that requires grad.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .. import _core
from .._arrays import check_no_grad, feature_indices, rows
from ..sae import SAE, live_sae as _lookup
from .cuda import for_tensor as _runner  # the SAE itself for CPU tensors, its device copy for CUDA ones
from ..steering import Steering


@torch.library.custom_op("saehook::encode", mutates_args=())
def _encode(x: torch.Tensor, handle: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    sae = _lookup(handle)
    return _runner(sae, x).encode(x, k)


@_encode.register_fake
def _(x, handle, k):
    shape = tuple(x.shape[:-1]) + (k,)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int32)


def _encode_setup(ctx, inputs, output):
    _, handle, _ = inputs
    ctx.handle = handle
    ctx.save_for_backward(output[1])


def _encode_backward(ctx, grad_vals, grad_idx):
    (idx,) = ctx.saved_tensors
    W = encoder_rows(_lookup(ctx.handle), idx)  # (..., k, d_model)
    grad_x = torch.einsum("...k,...kd->...d", grad_vals.to(torch.float32), W)
    return grad_x, None, None


torch.library.register_autograd("saehook::encode", _encode_backward, setup_context=_encode_setup)


@torch.library.custom_op("saehook::decode", mutates_args=())
def _decode(values: torch.Tensor, indices: torch.Tensor, handle: int) -> torch.Tensor:
    sae = _lookup(handle)
    return _runner(sae, values).decode(values, feature_indices(indices, sae.d_sae))


@_decode.register_fake
def _(values, indices, handle):
    return values.new_empty(tuple(values.shape[:-1]) + (_lookup(handle).d_model,), dtype=torch.float32)


def _decode_setup(ctx, inputs, output):
    _, indices, handle = inputs
    ctx.handle = handle
    ctx.save_for_backward(indices)


def _decode_backward(ctx, grad_out):
    (idx,) = ctx.saved_tensors
    D = decoder_rows(_lookup(ctx.handle), idx)  # (..., k, d_model)
    grad_vals = torch.einsum("...d,...kd->...k", grad_out.to(torch.float32), D.to(grad_out.device))
    return grad_vals, None, None


torch.library.register_autograd("saehook::decode", _decode_backward, setup_context=_decode_setup)


@torch.library.custom_op("saehook::steer_", mutates_args=("h",))
def _steer(h: torch.Tensor, handle: int, features: torch.Tensor, ops: torch.Tensor,
           values: torch.Tensor, normalize: torch.Tensor) -> None:
    sae = _lookup(handle)
    from ..steering import ITEM_DTYPE

    items = np.zeros(features.numel(), dtype=ITEM_DTYPE)
    items["feature"] = features.cpu().numpy()
    items["op"] = ops.cpu().numpy()
    items["value"] = values.cpu().numpy()
    items["normalize"] = normalize.cpu().numpy()
    if h.device.type != "cpu":
        _runner(sae, h).steer(items, h)
        return
    r = rows(h, sae.d_model, writable=True, name="h")
    if r.n and len(items):
        _core.steer(sae._handle, r.ptr, r.n, r.ld, items.ctypes.data, len(items), 0, 0, 0, 0, 0, 0)


@_steer.register_fake
def _(h, handle, features, ops, values, normalize):
    return None


@torch.library.custom_op("saehook::steer_items_", mutates_args=("h",))
def _steer_items(h: torch.Tensor, handle: int, items: torch.Tensor) -> None:
    """Steers h in place with saehook_steer_item records (Steering.items() viewed as int32 words:
    caps, rescales and conditions included; latches hold within the call)."""
    sae = _lookup(handle)
    from ..steering import ITEM_DTYPE

    arr = np.ascontiguousarray(items.detach().cpu().numpy().astype(np.int32, copy=False)).view(ITEM_DTYPE).reshape(-1)
    if h.device.type != "cpu":
        _runner(sae, h).steer(arr, h)
        return
    r = rows(h, sae.d_model, writable=True, name="h")
    if r.n and len(arr):
        _core.steer(sae._handle, r.ptr, r.n, r.ld, arr.ctypes.data, len(arr), 0, 0, 0, 0, 0, 0)


@_steer_items.register_fake
def _(h, handle, items):
    return None


# ---- friendly wrappers ----
def encode(sae: SAE, x: torch.Tensor, k: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.saehook.encode: (values, indices) of the Top-K features, differentiable in x."""
    return torch.ops.saehook.encode(x, sae.handle, int(k or sae.k))


def decode(sae: SAE, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """torch.ops.saehook.decode: sum_j values_j * W_dec[indices_j] + b_dec, differentiable in
    values. indices: an integer tensor in [0, d_sae), -1 for padding."""
    if indices.dtype == torch.bool or indices.dtype.is_floating_point or indices.dtype.is_complex:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    return torch.ops.saehook.decode(values, indices, sae.handle)


def steer_(steering: Steering, h: torch.Tensor) -> torch.Tensor:
    """Applies a Steering to float32 rows h in place (torch.ops.saehook.steer_items_: every op,
    conditions included, with latches holding within the call). No gradient: h must not require
    grad (torch raises if autograd saved h for a backward pass)."""
    check_no_grad(h, "h")
    items = steering.items()
    torch.ops.saehook.steer_items_(h, steering.sae.handle, torch.from_numpy(items.view(np.int32).copy()))
    return h


def decoder_rows(sae: SAE, idx: torch.Tensor) -> torch.Tensor:
    """Decoder directions of the given feature indices as float32 (..., k, d_model); padding
    (-1) -> 0. Reads k rows (or columns, for a column-major decoder) per index."""
    a = sae.arrays()
    flat = idx.reshape(-1).to(torch.int64)
    valid = flat >= 0
    sel = flat.clamp(min=0).cpu().numpy()
    W = a["W_dec"][sel] if sae.dec_layout == "rows" else a["W_dec"][:, sel].T
    if sae.dec_dtype == "bf16":
        W = (W.astype(np.uint32) << 16).view(np.float32)
    out = torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32)).to(idx.device)
    out = out * valid.to(out.device, torch.float32)[:, None]
    return out.reshape(tuple(idx.shape) + (sae.d_model,))


def encoder_rows(sae: SAE, idx: torch.Tensor) -> torch.Tensor:
    """W_enc rows of the given feature indices as float32 (..., k, d_model); padding (-1) -> 0."""
    a = sae.arrays()
    flat = idx.reshape(-1).to(torch.int64)
    valid = flat >= 0
    sel = flat.clamp(min=0).cpu().numpy()
    W = a["W_enc"][sel]
    if sae.enc_dtype == "bf16":
        W = (W.astype(np.uint32) << 16).view(np.float32)
    elif sae.enc_dtype == "int8":
        W = W.astype(np.float32) * a["enc_scales"][sel, None]
    out = torch.from_numpy(np.asarray(W, dtype=np.float32)).to(idx.device)
    out = out * valid.to(out.device, torch.float32)[:, None]
    return out.reshape(tuple(idx.shape) + (sae.d_model,))
