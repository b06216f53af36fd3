"""Loaders for the published SAE formats, detected from the path, and saehook's own format.

| format          | what the path is                                   | activation              |
|-----------------|----------------------------------------------------|-------------------------|
| Qwen-Scope      | `layer{n}.sae.pt` (or a directory of them)         | topk                    |
| SAELens         | directory with cfg.json + sae_weights.safetensors  | relu, topk_relu, jumprelu|
| Gemma Scope     | params.npz (or the directory holding it)           | jumprelu                |
| sparsify        | directory with cfg.json + sae.safetensors          | topk_relu, x - b_dec    |
| saehook         | one .safetensors file with saehook metadata        | any                     |

A directory of per-layer files (Qwen-Scope) or per-hook-point folders (sparsify, SAELens)
loads as an SAESet keyed by layer.

Weights stay where the file puts them (memory-mapped) except where a format stores the
encoder input-major (SAELens, Gemma Scope): the kernels need one contiguous row per feature,
so that W_enc is transposed once into an owned copy. `.pt` files are read with
torch.load(weights_only=True): a pickle that holds anything but tensors and plain containers is
refused, never executed.
"""
from ._common import DEFAULT_CAP, SAEFormatError, mapped_tensors
from .loading import SAESet, load
from .saehook_format import FORMAT_VERSION, save_saehook

__all__ = ["DEFAULT_CAP", "FORMAT_VERSION", "SAEFormatError", "SAESet", "load", "mapped_tensors", "save_saehook"]
