"""Format detection: which loader a path goes to, and directories of per-layer SAEs (SAESet)."""
from __future__ import annotations

import collections.abc
import os
from typing import Any, Callable, Dict, Iterator, List, Optional

from ..sae import SAE
from . import _finite
from ._common import SAEFormatError, _LAYER_IN_HOOK, _LAYER_IN_NAME, _last_int, _require_regular, mapped_tensors  # noqa
from .gemmascope import load_gemmascope
from .qwenscope import load_qwenscope
from .saehook_format import load_saehook
from .saelens import load_saelens
from .sparsify import load_sparsify

_FORMATS_LOOKED_FOR = (
    "Qwen-Scope layer{n}.sae.pt / .pt / .pth files, a SAELens directory (cfg.json + "
    "sae_weights.safetensors), Gemma Scope params.npz, a sparsify directory (cfg.json + "
    "sae.safetensors), saehook .safetensors files, or a directory of per-layer files or folders")


class SAESet(collections.abc.Mapping):
    """SAEs of several layers of one release: a read-only mapping layer -> SAE."""

    def __init__(self, saes: Dict[int, SAE], source: str = ""):
        self._saes = dict(sorted(saes.items()))
        self.source = source

    def __getitem__(self, layer: int) -> SAE:
        try:
            return self._saes[int(layer)]
        except (KeyError, TypeError, ValueError):
            raise KeyError(f"no SAE for layer {layer!r} in {self.source or 'this set'}; "
                           f"layers: {self.layers}") from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._saes)

    def __len__(self) -> int:
        return len(self._saes)

    @property
    def layers(self) -> List[int]:
        return list(self._saes)

    def __repr__(self) -> str:
        first = next(iter(self._saes.values()), None)
        where = f" from {self.source}" if self.source else ""
        return f"SAESet({len(self)} layers {self.layers}{where}; first: {first!r})"


def load(path: Any, *, k: Optional[int] = None, layer: Optional[int] = None,
         dtype: Optional[str] = None, check_finite: bool = True):
    """Loads an SAE, or an SAESet for a directory holding several layers, in any supported format.

    k: active features per token. Qwen-Scope files do not store it: it comes from the release
       name in the path (`...-L0_100` -> 100) unless given. For SAELens TopK and sparsify it
       overrides the trained k. For relu/jumprelu SAEs it caps the features returned per token
       (default min(d_sae, 256); a token with more active features keeps the largest).
    layer: picks one layer of a multi-layer directory (returning an SAE), or sets the layer of
       a single file whose name does not carry it.
    dtype: converts after loading with SAE.to_dtype ('int8' quantizes the encoder).
    check_finite: reads every weight, bias, threshold and scale once and refuses NaN/Inf (about
       0.06 s per GiB from the page cache, one disk read when cold; README "Memory"). False skips
       it for files already known to be good.
    Raises SAEFormatError (naming the file) for anything that is not a loadable SAE.
    metadata["mapped"] says whether any weight is memory-mapped from the file (then the file
    must not be truncated or rewritten in place while the SAE is in use: README "Memory").
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SAEFormatError(f"{path}: no such file or directory")
    if k is not None and int(k) < 1:
        raise SAEFormatError(f"{path}: k must be a positive integer, got {k!r}")
    if not os.path.isdir(path):
        _require_regular(path)
    obj = _dispatch(path, None if k is None else int(k), None if layer is None else int(layer))
    if check_finite:
        for sae in (obj.values() if isinstance(obj, SAESet) else (obj,)):
            try:
                _finite.check_sae(sae, sae.metadata.get("source") or path)
            except _finite.NonFiniteError as e:
                raise SAEFormatError(str(e)) from None
    if dtype is not None:
        if isinstance(obj, SAESet):
            obj = SAESet({lay: s.to_dtype(dtype) for lay, s in obj.items()}, obj.source)
        else:
            obj = obj.to_dtype(dtype)
    for sae in (obj.values() if isinstance(obj, SAESet) else (obj,)):
        sae.metadata["mapped"] = bool(mapped_tensors(sae))
    return obj


def _dispatch(path: str, k: Optional[int], layer: Optional[int]):
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if "cfg.json" in names and "sae_weights.safetensors" in names:
            return load_saelens(path, k, layer)
        if "cfg.json" in names and "sae.safetensors" in names:
            return load_sparsify(path, k, layer)
        if "params.npz" in names:
            return load_gemmascope(os.path.join(path, "params.npz"), k, layer)
        files = {n: _last_int(_LAYER_IN_NAME, n) for n in names if n.endswith((".pt", ".pth"))}
        files = {n: lay for n, lay in files.items() if lay is not None}
        if files:
            return _layer_set(path, files, layer, lambda p, lay: load_qwenscope(p, k, lay))
        folders = {n: _last_int(_LAYER_IN_HOOK, n) for n in names
                   if os.path.isfile(os.path.join(path, n, "cfg.json"))}
        folders = {n: lay for n, lay in folders.items() if lay is not None}
        if folders:  # a sparsify or SAELens release: one folder per hook point
            return _layer_set(path, folders, layer, lambda p, lay: _dispatch(p, k, lay))
        raise SAEFormatError(f"{path}: no SAE found in this directory; looked for {_FORMATS_LOOKED_FOR}")
    lower = path.lower()
    if lower.endswith((".pt", ".pth")):
        return load_qwenscope(path, k, layer)
    if lower.endswith(".safetensors"):
        return load_saehook(path, k, layer)
    if lower.endswith(".npz"):
        return load_gemmascope(path, k, layer)
    raise SAEFormatError(f"{path}: unknown SAE format; looked for {_FORMATS_LOOKED_FOR}")


def _layer_set(path: str, entries: Dict[str, int], layer: Optional[int],
               load_one: Callable[[str, int], SAE]):
    """An SAESet from {entry name: layer}, or the one SAE of `layer`."""
    by_layer: Dict[int, List[str]] = {}
    for name, lay in sorted(entries.items()):
        by_layer.setdefault(lay, []).append(name)
    wanted = by_layer if layer is None else {layer: by_layer.get(layer, [])}
    for lay, found in wanted.items():
        if not found:
            raise SAEFormatError(f"{path}: no layer {lay}; layers present: {sorted(by_layer)}")
        if len(found) > 1:  # e.g. sparsify's layers.4 and layers.4.mlp
            raise SAEFormatError(f"{path}: several SAEs for layer {lay} ({', '.join(found)}); "
                                 f"load one of them by its path")
    if layer is not None:
        return load_one(os.path.join(path, by_layer[layer][0]), layer)
    return SAESet({lay: load_one(os.path.join(path, found[0]), lay) for lay, found in by_layer.items()}, path)
