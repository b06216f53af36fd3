"""transformers integration: capture SAE features and steer a causal LM with forward hooks on
its decoder layers. The residual stream after layer L is the output of decoder layer L
(= hidden_states[L + 1]), which is what Qwen-Scope's `layer{L}` SAEs read.

    with saehook.hf.capture(model, {12: sae}) as rec:
        model(**inputs)
    rec[12].values, rec[12].indices        # (n_tokens, k), in the order tokens were evaluated

    with saehook.hf.steer(model, saehook.Steering(sae, layer=12).clamp(f, 8.0)):
        model.generate(...)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Mapping, Optional

import numpy as np

from ..sae import SAE
from ..steering import Steering


def decoder_layers(model) -> List[Any]:
    """The list of decoder blocks of a transformers causal LM (Qwen, Llama, Gemma, GPT-2, ...)."""
    for path in ("model.layers", "model.model.layers", "layers", "transformer.h", "gpt_neox.layers",
                 "model.language_model.layers", "language_model.model.layers"):
        obj = model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if hasattr(obj, "__len__") and len(obj) > 0:
            return list(obj)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def _hidden_size(model) -> Optional[int]:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "hidden_size", None)


def _check(model, layer: int, sae: SAE) -> Any:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is outside the model (it has {len(layers)} decoder layers)")
    width = _hidden_size(model)
    if width is not None and width != sae.d_model:
        raise ValueError(f"d_model mismatch: the SAE for layer {layer} has d_model={sae.d_model}, "
                         f"the model's hidden size is {width}")
    return layers[layer]


def _split_output(output):
    """(hidden, rebuild) for a decoder layer's output, tensor or tuple."""
    if isinstance(output, tuple):
        return output[0], lambda h: (h,) + tuple(output[1:])
    return output, lambda h: h


@dataclass
class LayerRecord:
    """Features captured at one layer: one entry per forward call, rows in token order."""

    values_per_call: List[np.ndarray] = field(default_factory=list)
    indices_per_call: List[np.ndarray] = field(default_factory=list)
    shapes: List[tuple] = field(default_factory=list)  # (batch, seq) of each call
    residuals_per_call: List[np.ndarray] = field(default_factory=list)

    @property
    def values(self) -> np.ndarray:
        return np.concatenate(self.values_per_call) if self.values_per_call else np.zeros((0, 0), np.float32)

    @property
    def indices(self) -> np.ndarray:
        return np.concatenate(self.indices_per_call) if self.indices_per_call else np.zeros((0, 0), np.int32)

    @property
    def residuals(self) -> np.ndarray:
        if not self.residuals_per_call:
            raise ValueError("residuals were not recorded; use capture(..., residuals=True)")
        return np.concatenate(self.residuals_per_call)


class Recorder(dict):
    """layer -> LayerRecord."""


@contextlib.contextmanager
def capture(model, saes: Mapping[int, SAE], *, k: Optional[int] = None,
            residuals: bool = False) -> Iterator[Recorder]:
    """Records the Top-K features of the residual stream after each given layer for every
    forward call inside the block. Rows are flattened (batch, seq) -> tokens, batch-major.
    At a steered layer the record holds the residual before the steering (as in saehook.llama).
    A model on a GPU is encoded there by saehook's CUDA kernels (saehook.cuda) when this build
    has them, else on a CPU copy of the residual."""
    rec = Recorder()
    handles = []
    try:
        for layer, sae in saes.items():
            layer = int(layer)
            block = _check(model, layer, sae)
            rec[layer] = LayerRecord()

            def hook(module, inputs, output, _sae=sae, _rec=rec[layer]):
                hidden, _ = _split_output(output)
                x = hidden.detach()
                runner, x = _runner(_sae, x)
                vals, idx = runner.encode(x, k)
                _rec.values_per_call.append(vals.reshape(-1, vals.shape[-1]).cpu().numpy())
                _rec.indices_per_call.append(idx.reshape(-1, idx.shape[-1]).cpu().numpy())
                _rec.shapes.append(tuple(hidden.shape[:-1]))
                if residuals:
                    _rec.residuals_per_call.append(x.float().reshape(-1, x.shape[-1]).cpu().numpy().copy())

            # prepend: the capture sees the block's own output, before any steering hook.
            handles.append(block.register_forward_hook(hook, prepend=True))
        yield rec
    finally:
        for h in handles:
            h.remove()


def _runner(sae: SAE, x):
    """(what runs the SAE, x where it runs): on a CUDA tensor the SAE's device copy
    (saehook.cuda.cached) when this build has CUDA kernels, else the SAE on a CPU copy of x."""
    if x.device.type == "cpu":
        return sae, x
    if x.device.type == "cuda":
        from . import cuda

        if cuda.is_available():
            return cuda.cached(sae, x.device), x
    return sae, x.cpu()


def _steered(hidden, steering: Steering, mask: Optional[np.ndarray]):
    """hidden with the steering applied; in place when that is safe, else on a float32 copy.
    With autograd on, the change is added as a constant (gradients pass straight through)."""
    import torch

    detached = hidden.detach()
    runner, x = _runner(steering.sae, detached)
    apply = steering.apply if runner is steering.sae else (lambda h, mask: runner.steer(steering, h, mask=mask))
    in_place = (x is detached and hidden.dtype == torch.float32 and hidden.is_contiguous()
                and not (torch.is_grad_enabled() and hidden.requires_grad))
    if in_place:
        apply(hidden, mask=mask)
        return hidden
    work = x.to(torch.float32).contiguous().clone()
    before = work.clone()
    apply(work, mask=mask)
    delta = (work - before).to(hidden.device, hidden.dtype)
    return hidden + delta


@contextlib.contextmanager
def steer(model, *steerings: Steering) -> Iterator[None]:
    """Applies each Steering to the residual stream after its layer in every forward call inside
    the block. positions='prompt' steers the first forward call (the prompt, in generate), and
    'generated' the later ones (one new token each with a KV cache)."""
    handles = []
    try:
        for st in steerings:
            if st.layer is None:
                raise ValueError("Steering has no layer: pass layer= or use an SAE with a layer")
            block = _check(model, st.layer, st.sae)
            calls = [0]

            def hook(module, inputs, output, _st=st, _calls=calls):
                hidden, rebuild = _split_output(output)
                first = _calls[0] == 0
                _calls[0] += 1
                if (_st.positions == "prompt" and not first) or (_st.positions == "generated" and first):
                    return None
                return rebuild(_steered(hidden, _st, None))

            handles.append(block.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def splice(model, saes: Mapping[int, SAE]) -> Iterator[None]:
    """Replaces the residual stream after each given layer by its SAE reconstruction
    decode(encode(h)) in every forward call inside the block (to measure the loss with the SAE
    spliced in)."""
    import torch

    handles = []
    try:
        for layer, sae in saes.items():
            block = _check(model, int(layer), sae)

            def hook(module, inputs, output, _sae=sae):
                hidden, rebuild = _split_output(output)
                runner, x = _runner(_sae, hidden.detach())
                rec = runner.reconstruct(x.to(torch.float32).contiguous())
                return rebuild(rec.to(hidden.device, hidden.dtype))

            handles.append(block.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
