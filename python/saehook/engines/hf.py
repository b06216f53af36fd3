"""transformers integration: capture SAE features and steer a causal LM with forward hooks on
its decoder layers. The residual stream after layer L is the output of decoder layer L
(= hidden_states[L + 1]), which is what Qwen-Scope's `layer{L}` SAEs read.

    with saehook.hf.capture(model, {12: sae}) as rec:
        model(**inputs)
    rec[12].values, rec[12].indices        # (n_tokens, k), in the order tokens were evaluated

    with saehook.hf.steer(model, saehook.Steering(sae, layer=12).clamp(f, 8.0)):
        model.generate(...)

    st = saehook.Steering(sae, layer=12).rescale(f, 0.0, when=saehook.When(g, above=2.0, latch=True))
    with saehook.hf.steer(model, st.stop_when(saehook.When(h, above=5.0))) as session:
        out = model.generate(ids, stopping_criteria=session.stopping_criteria())
    session.stops[0]     # StopEvent(steering, condition, index, position) of batch row 0, or None
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Mapping, Optional

import numpy as np

from ..sae import SAE
from ..steering import Steering, SteeringState


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


def _steered(hidden, steering: Steering, mask: Optional[np.ndarray], state: Optional[SteeringState] = None,
             slots: Optional[np.ndarray] = None):
    """(hidden with the steering applied, fired: Steering.apply_report's rows x items, or None);
    in place when that is safe, else on a float32 copy. With autograd on, the change is added as
    a constant (gradients pass straight through). On a GPU the CUDA kernels steer the residual
    where it is; conditions, latches and stops keep their state and report in host memory."""
    import torch

    detached = hidden.detach()
    runner, x = _runner(steering.sae, detached)
    stateful = state is not None or bool(steering.stops) or any(o.when is not None for o in steering.ops)
    fired = []
    if runner is steering.sae:
        def apply(h, mask):
            fired.append(steering.apply_report(h, mask=mask, state=state, slots=slots))
    else:
        def apply(h, mask):
            out = None
            if stateful:
                items = steering.items() if state is None else state.items
                out = np.zeros((int(np.prod(h.shape[:-1])), len(items)), np.uint8)
            runner.steer(steering if state is None else state.items, h, mask=mask, state=state, slots=slots,
                         fired=out)
            if out is not None:
                fired.append(out.view(bool))
    in_place = (x is detached and hidden.dtype == torch.float32 and hidden.is_contiguous()
                and not (torch.is_grad_enabled() and hidden.requires_grad))
    if in_place:
        apply(hidden, mask=mask)
        return hidden, (fired[0] if fired else None)
    work = x.to(torch.float32).contiguous().clone()
    before = work.clone()
    apply(work, mask=mask)
    delta = (work - before).to(hidden.device, hidden.dtype)
    return hidden + delta, (fired[0] if fired else None)


@dataclass
class StopEvent:
    """A stop_when condition that held on a generated token."""

    steering: Steering
    condition: Any       # the saehook.When that fired (an element of steering.stops)
    index: int           # its index in steering.stops
    position: int        # the absolute position of the token it fired on


class SteerSession:
    """What hf.steer yields: per batch row, the first stop event of the running generation
    (stops[b], None while none fired). A forward call that starts a sequence at position 0 resets
    it, and the latches."""

    def __init__(self):
        self.stops: List[Optional[StopEvent]] = []

    def _begin(self, batch: int) -> None:
        self.stops = [None] * batch

    def stopping_criteria(self):
        """A transformers StoppingCriteriaList ending generate() for a row once a stop fired there.
        generate() samples one more token after the forward that fired: the token the condition
        held on is at stops[b].position, and the output is complete up to and including it."""
        import torch
        import transformers

        session = self

        class _Stop(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = [b < len(session.stops) and session.stops[b] is not None for b in range(input_ids.shape[0])]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        return transformers.StoppingCriteriaList([_Stop()])


def _positions(hidden, kwargs, counter: List[int]) -> np.ndarray:
    """(batch, seq) absolute positions of the rows of a decoder layer's output: its position_ids
    argument, else a running count of the tokens seen since the last call that started at 0."""
    b, s = (hidden.shape[0], hidden.shape[1]) if hidden.dim() == 3 else (1, hidden.shape[0])
    pid = kwargs.get("position_ids") if kwargs else None
    if pid is not None:
        pos = pid.detach().cpu().numpy().astype(np.int64)
        return np.broadcast_to(pos.reshape(-1, pos.shape[-1]), (b, s))
    start = 0 if counter[0] < 0 else counter[0]
    counter[0] = start + s
    return np.broadcast_to(np.arange(start, start + s, dtype=np.int64), (b, s))


@contextlib.contextmanager
def steer(model, *steerings: Steering) -> Iterator[SteerSession]:
    """Applies each Steering to the residual stream after its layer in every forward call inside
    the block, and yields a SteerSession (stop events of stop_when conditions). A forward call
    whose positions start at 0 begins a sequence (the prompt, in generate): positions='prompt'
    steers its rows, 'generated' those of the later calls (one new token each with a KV cache),
    (start, end) the rows at absolute positions start <= pos < end (the layer's position_ids).
    Latched conditions keep one state per batch row, reset at each new sequence."""
    handles = []
    session = SteerSession()
    try:
        for st in steerings:
            if st.layer is None:
                raise ValueError("Steering has no layer: pass layer= or use an SAE with a layer")
            block = _check(model, st.layer, st.sae)
            ctx = {"state": None, "generated": False, "counter": [-1]}

            def hook(module, args, kwargs, output, _st=st, _ctx=ctx, _stop_items=st.stop_items(), _latched=st.latched):
                hidden, rebuild = _split_output(output)
                pos = _positions(hidden, kwargs, _ctx["counter"])
                b, s = pos.shape
                if (pos == 0).any():  # a new sequence: its prompt
                    _ctx["generated"] = False
                    _ctx["state"] = SteeringState(_st, b) if _latched else None
                    if _stop_items:
                        session._begin(b)
                else:
                    _ctx["generated"] = True
                mask = _st.position_mask(pos.reshape(-1), _ctx["generated"])
                if not mask.any() and not _stop_items and not _latched:
                    return None
                slots = np.repeat(np.arange(b, dtype=np.int32), s)
                out, fired = _steered(hidden, _st, None if mask.all() else mask, _ctx["state"], slots)
                if _stop_items and _ctx["generated"] and fired is not None:
                    hits = fired[:, _stop_items].reshape(b, s, len(_stop_items))
                    if len(session.stops) != b:
                        session._begin(b)
                    for row in range(b):
                        where = np.argwhere(hits[row])
                        if session.stops[row] is None and len(where):
                            t, c = where[0]
                            session.stops[row] = StopEvent(_st, _st.stops[int(c)], int(c), int(pos[row, t]))
                return rebuild(out)

            handles.append(block.register_forward_hook(hook, with_kwargs=True))
        yield session
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
