"""Training Top-K SAEs on a model's residual stream (the standard recipe of Gao et al. 2024 as
sparsify implements it):

- encode relu(W_enc (x - b_dec) + b_enc), keep the k largest; decode W_dec^T a + b_dec;
- decoder rows kept at unit norm (and their gradient's radial part removed);
- b_dec initialised to the mean of the first batch, W_dec to the encoder's transpose;
- loss: fraction of variance unexplained, plus an auxiliary loss in which the top k_aux
  *dead* latents (no activation for `dead_tokens` tokens) reconstruct the residual error, which
  revives them;
- Adam with lr 2e-4 / sqrt(d_sae / 16384) by default.

Activations stream in batches (never all in memory); training checkpoints every
`checkpoint_every` steps and resumes from the checkpoint file. The result is a saehook SAE
(activation topk_relu, b_dec subtracted from the input).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from ..sae import SAE


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("training needs torch: pip install 'saehook[torch]'") from None
    return torch


def fvu(x, x_hat):
    return ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp_min(1e-12)


def check_train_args(d_model: int, d_sae: int, k: int, steps: int, lr: Optional[float] = None) -> None:
    """Refuses settings that cannot train, before any work (and before any activations are read)."""
    for name, v in (("d_model", d_model), ("d_sae", d_sae), ("k", k), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {v!r}")
    if k > d_sae:
        raise ValueError(f"k = {k} is larger than d_sae = {d_sae}: a Top-K SAE keeps k of its d_sae features")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")


def train_sae(batches: Iterable[np.ndarray], d_model: int, d_sae: int, k: int, *, steps: int,
              lr: Optional[float] = None, aux_coef: float = 1 / 32, dead_tokens: int = 100_000,
              seed: int = 0, checkpoint: Optional[str] = None, checkpoint_every: int = 200,
              metadata: Optional[dict] = None, progress: Optional[Callable[[int, float], None]] = None) -> SAE:
    """Trains for `steps` batches drawn from `batches` (each an (n, d_model) float array). With a
    checkpoint path, resumes from it when it exists (skipping the batches already used)."""
    check_train_args(d_model, d_sae, k, steps, lr)
    torch = _torch()
    torch.manual_seed(seed)
    W_enc = torch.randn(d_sae, d_model) / math.sqrt(d_model)
    params = {"W_enc": W_enc, "b_enc": torch.zeros(d_sae), "W_dec": W_enc.clone(), "b_dec": torch.zeros(d_model)}
    params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr or 2e-4 / math.sqrt(d_sae / 16384), eps=6.25e-10)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    start = 0
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
        opt.load_state_dict(state["optimizer"])
        since_fired = state["since_fired"]
        start = int(state["step"])
    k_aux = max(1, d_model // 2)
    it: Iterator[np.ndarray] = iter(batches)
    for _ in range(start):  # the batches a resumed run already trained on
        next(it)
    for step in range(start, steps):
        x = torch.as_tensor(np.asarray(next(it), dtype=np.float32))
        if step == 0:
            with torch.no_grad():
                params["b_dec"].copy_(x.mean(0))
        pre = torch.relu((x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"])
        vals, idx = pre.topk(k, dim=1)
        x_hat = torch.zeros_like(pre).scatter(1, idx, vals) @ params["W_dec"] + params["b_dec"]
        loss = fvu(x, x_hat)
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[idx[vals > 0]] = True
        since_fired += x.shape[0]
        since_fired[fired] = 0
        dead = since_fired >= dead_tokens
        if dead.any():  # auxiliary loss: dead latents model the residual error
            err = (x - x_hat).detach()
            aux_pre = torch.where(dead[None], pre, torch.zeros_like(pre))
            a_vals, a_idx = aux_pre.topk(min(k_aux, int(dead.sum())), dim=1)
            e_hat = torch.zeros_like(pre).scatter(1, a_idx, a_vals) @ params["W_dec"]
            loss = loss + aux_coef * fvu(err, e_hat)
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():  # keep decoder rows on the unit sphere
            W, g = params["W_dec"], params["W_dec"].grad
            g -= (g * W).sum(1, keepdim=True) * W
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
        if progress:
            progress(step + 1, float(loss.detach()))
        if checkpoint and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            state = {name: p.detach().clone() for name, p in params.items()}
            state.update(optimizer=opt.state_dict(), since_fired=since_fired, step=torch.tensor(step + 1))
            tmp = checkpoint + ".tmp"
            torch.save(state, tmp)
            os.replace(tmp, checkpoint)
    d = {name: p.detach().numpy().copy() for name, p in params.items()}
    return SAE(d["W_enc"], d["W_dec"], d["b_enc"], d["b_dec"], k=k, activation="topk_relu", subtract_b_dec=True,
               dec_layout="rows", metadata=dict(metadata or {}))


def shuffled_batches(rows: Iterable[np.ndarray], batch: int, buffer: int = 8192, seed: int = 0) -> Iterator[np.ndarray]:
    """Batches of `batch` rows drawn from a shuffling buffer over a stream of row blocks (so
    consecutive tokens of one document do not fill a batch), never holding more than `buffer`."""
    rng = np.random.default_rng(seed)
    pool: list = []
    for block in rows:
        pool.extend(np.asarray(block, dtype=np.float32))
        while len(pool) >= buffer:
            pick = rng.permutation(len(pool))
            out = [pool[i] for i in pick[:batch]]
            pool = [pool[i] for i in pick[batch:]]
            yield np.stack(out)
    rng.shuffle(pool)
    for i in range(0, len(pool) - batch + 1, batch):
        yield np.stack(pool[i:i + batch])
