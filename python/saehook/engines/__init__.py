"""The engines that run a model with SAEs inside its forward pass.

- `llama`: llama.cpp through llama-cpp-python (HookedLlama, a C++ cb_eval hook; control vectors).
- `hf`: transformers models (forward hooks on the decoder layers).
- `torch_ops`: torch custom ops (encode/decode/steer on CPU and CUDA tensors, torch.compile).
- `cuda`: saehook's CUDA kernels on device memory (used by torch_ops and hf for GPU tensors).
- `protocol`: the Engine interface the CLI and the workflows use, and open_engine(), which picks
  llama.cpp for a .gguf file and transformers for anything else.

The public names are saehook.llama, saehook.hf, saehook.torch_ops and saehook.cuda; each engine
module is imported only when used (llama-cpp-python, torch and transformers are optional).
"""
from .protocol import Engine, HFEngine, LlamaEngine, open_engine

__all__ = ["Engine", "HFEngine", "LlamaEngine", "open_engine"]
