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
from __future__ import annotations

import collections.abc
import json
import os
import re
import zipfile
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np

from . import safetensors_io as st
from .sae import ACTIVATIONS, DEC_LAYOUTS, SAE

FORMAT_VERSION = "1"
# Default cap on the features returned per token for SAEs whose activation has no k
# (relu, jumprelu): the kernels return a fixed number of (value, index) pairs.
DEFAULT_CAP = 256

_K_IN_PATH = re.compile(r"L0_(\d+)")                          # Qwen-Scope release: ...-L0_100
_QWEN_RELEASE = re.compile(r"SAE-Res-(.+?)-W\d+K")            # SAE-Res-Qwen3.5-9B-Base-W64K-...
_LAYER_IN_NAME = re.compile(r"(?<![A-Za-z])layer[_-]?(\d+)")  # layer12.sae.pt, layer_9/
# Hook points: blocks.12.hook_resid_post (TransformerLens), layers.12 / model.layers.12
# (transformers modules, sparsify), h.12 (GPT-2).
_LAYER_IN_HOOK = re.compile(r"(?<![A-Za-z])(?:blocks|layers|h)[._](\d+)")
_L0_IN_PATH = re.compile(r"average_l0_(\d+)")                 # Gemma Scope: .../average_l0_71/

_FORMATS_LOOKED_FOR = (
    "Qwen-Scope layer{n}.sae.pt / .pt / .pth files, a SAELens directory (cfg.json + "
    "sae_weights.safetensors), Gemma Scope params.npz, a sparsify directory (cfg.json + "
    "sae.safetensors), saehook .safetensors files, or a directory of per-layer files or folders")


class SAEFormatError(ValueError):
    """A file that is not a loadable SAE: the message names the file and the problem."""


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
         dtype: Optional[str] = None):
    """Loads an SAE, or an SAESet for a directory holding several layers, in any supported format.

    k: active features per token. Qwen-Scope files do not store it: it comes from the release
       name in the path (`...-L0_100` -> 100) unless given. For SAELens TopK and sparsify it
       overrides the trained k. For relu/jumprelu SAEs it caps the features returned per token
       (default min(d_sae, 256); a token with more active features keeps the largest).
    layer: picks one layer of a multi-layer directory (returning an SAE), or sets the layer of
       a single file whose name does not carry it.
    dtype: converts after loading with SAE.to_dtype ('int8' quantizes the encoder).
    Raises SAEFormatError (naming the file) for anything that is not a loadable SAE.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SAEFormatError(f"{path}: no such file or directory")
    if k is not None and int(k) < 1:
        raise SAEFormatError(f"{path}: k must be a positive integer, got {k!r}")
    obj = _dispatch(path, None if k is None else int(k), None if layer is None else int(layer))
    if dtype is not None:
        if isinstance(obj, SAESet):
            return SAESet({lay: s.to_dtype(dtype) for lay, s in obj.items()}, obj.source)
        return obj.to_dtype(dtype)
    return obj


def _dispatch(path: str, k: Optional[int], layer: Optional[int]):
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if "cfg.json" in names and "sae_weights.safetensors" in names:
            return _load_saelens(path, k, layer)
        if "cfg.json" in names and "sae.safetensors" in names:
            return _load_sparsify(path, k, layer)
        if "params.npz" in names:
            return _load_gemmascope(os.path.join(path, "params.npz"), k, layer)
        files = {n: _last_int(_LAYER_IN_NAME, n) for n in names if n.endswith((".pt", ".pth"))}
        files = {n: lay for n, lay in files.items() if lay is not None}
        if files:
            return _layer_set(path, files, layer, lambda p, lay: _load_qwenscope(p, k, lay))
        folders = {n: _last_int(_LAYER_IN_HOOK, n) for n in names
                   if os.path.isfile(os.path.join(path, n, "cfg.json"))}
        folders = {n: lay for n, lay in folders.items() if lay is not None}
        if folders:  # a sparsify or SAELens release: one folder per hook point
            return _layer_set(path, folders, layer, lambda p, lay: _dispatch(p, k, lay))
        raise SAEFormatError(f"{path}: no SAE found in this directory; looked for {_FORMATS_LOOKED_FOR}")
    lower = path.lower()
    if lower.endswith((".pt", ".pth")):
        return _load_qwenscope(path, k, layer)
    if lower.endswith(".safetensors"):
        return _load_saehook(path, k, layer)
    if lower.endswith(".npz"):
        return _load_gemmascope(path, k, layer)
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


# ---------------- helpers ----------------
def _last_int(pattern: "re.Pattern[str]", text: Optional[str]) -> Optional[int]:
    """The last match's number: in a path, the innermost directory or the file name wins."""
    found = pattern.findall(text or "")
    return int(found[-1]) if found else None


def _need(tensors: Dict[str, Any], names: List[str], path: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(f"{path}: missing tensor(s) {', '.join(missing)} "
                             f"(the file has: {', '.join(sorted(tensors)) or 'nothing'})")


def _shape_check(path: str, shapes: Dict[str, Any]) -> None:
    """shapes: {name: (actual shape, expected shape)}."""
    bad = [f"{n} is {tuple(got)}, expected {tuple(want)}" for n, (got, want) in shapes.items()
           if tuple(got) != tuple(want)]
    if bad:
        raise SAEFormatError(f"{path}: inconsistent shapes: {'; '.join(bad)}")


def _matrix(arr: Any, name: str, layout: str, path: str):
    if len(arr.shape) != 2:
        raise SAEFormatError(f"{path}: {name} must be 2-D {layout}, got shape {tuple(arr.shape)}")
    return tuple(arr.shape)


def _make(path: str, build: Callable[[], SAE]) -> SAE:
    """Builds the SAE, turning the constructor's complaints into format errors naming the file."""
    try:
        return build()
    except (ValueError, TypeError) as e:
        if isinstance(e, SAEFormatError):
            raise
        raise SAEFormatError(f"{path}: {e}") from None


def _f32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    """An array read from safetensors as float32 (bf16 bits widened exactly). Copies."""
    if st_dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def _read_cfg(folder: str) -> dict:
    cfg_path = os.path.join(folder, "cfg.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{cfg_path}: cannot read the config ({e})") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{cfg_path}: expected a JSON object")
    return cfg


def _read_safetensors(path: str) -> st.Contents:
    if not os.path.isfile(path):
        raise SAEFormatError(f"{path}: no such file")
    try:
        return st.read(path)
    except st.SafetensorsError as e:
        raise SAEFormatError(str(e)) from None
    except OSError as e:
        raise SAEFormatError(f"{path}: {e}") from None


# ---------------- Qwen-Scope ----------------
def _load_qwenscope(path: str, k: Optional[int], layer: Optional[int]) -> SAE:
    """`layer{n}.sae.pt`: a dict W_enc (d_sae, d_model), W_dec (d_model, d_sae), b_enc, b_dec.

    Encoding as the release's model card computes it: pre = x @ W_enc.T + b_enc, the k largest
    pre kept as they are (activation 'topk'); W_dec is used in place, column-major
    (dec_layout='cols'). The tensors are memory-mapped by torch.load and passed through.
    """
    try:
        import torch
    except ImportError:
        raise SAEFormatError(f"{path}: reading .pt files needs torch (pip install 'saehook[torch]')") from None
    try:
        # mmap=True maps the zip's tensor records instead of reading GBs; only the legacy
        # (pre-zipfile) torch.save format cannot be mapped.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError (non-tensor payloads), truncated zip, bad magic, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SAEFormatError(f"{path}: not a loadable tensor checkpoint with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {first})") from None
    if not isinstance(sd, dict):
        raise SAEFormatError(f"{path}: expected a dict of tensors, found a {type(sd).__name__}")
    names = ["W_enc", "W_dec", "b_enc", "b_dec"]
    _need(sd, names, path)
    for name in names:
        if not isinstance(sd[name], torch.Tensor):
            raise SAEFormatError(f"{path}: {name} is a {type(sd[name]).__name__}, not a tensor")
    d_sae, d_model = _matrix(sd["W_enc"], "W_enc", "(d_sae, d_model)", path)
    _shape_check(path, {"W_dec": (sd["W_dec"].shape, (d_model, d_sae)), "b_enc": (sd["b_enc"].shape, (d_sae,)),
                        "b_dec": (sd["b_dec"].shape, (d_model,))})
    full = os.path.abspath(path)
    if k is None:
        k = _last_int(_K_IN_PATH, full)
        if k is None:
            raise SAEFormatError(f"{path}: Qwen-Scope files do not store k and the path names no release "
                                 f"(…-L0_<k>); pass k= (e.g. SAE-Res-Qwen3.5-9B-Base-W64K-L0_100 means k=100)")
    if layer is None:
        layer = _last_int(_LAYER_IN_NAME, os.path.basename(path))
    meta = {"format": "qwen-scope", "layer": layer, "hook_point": "resid_post", "source": path}
    releases = _QWEN_RELEASE.findall(full)  # also inside a Hugging Face cache path (models--Qwen--SAE-Res-...)
    if releases:
        meta["model"] = releases[-1]
    return _make(path, lambda: SAE(sd["W_enc"], sd["W_dec"], sd["b_enc"], sd["b_dec"], k=k, activation="topk",
                                   dec_layout="cols", metadata=meta))


# ---------------- SAELens ----------------
_SAELENS_ACTIVATIONS = {"standard": "relu", "topk": "topk_relu", "jumprelu": "jumprelu"}


def _load_saelens(folder: str, k: Optional[int], layer: Optional[int]) -> SAE:
    """A SAELens folder: cfg.json + sae_weights.safetensors with W_enc (d_in, d_sae),
    W_dec (d_sae, d_in), b_enc, b_dec (and threshold for jumprelu).

    As SAELens's inference SAEs (sae_lens/saes/*.py) compute it:
        pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc
        standard: relu(pre); jumprelu: relu(pre) * (pre > threshold);
        topk: the k largest pre, then relu; x_hat = acts @ W_dec + b_dec.
    Configs written before SAELens 6.0 get SAELens's own defaults (handle_pre_6_0_config):
    apply_b_dec_to_input=True, hook_point -> hook_name, activation_fn 'topk' -> architecture topk.

    Memory: W_enc is stored input-major and the kernels need it feature-major, so it is
    transposed into one owned copy; W_dec, stored (d_sae, d_in), stays a mapped view
    (dec_layout='rows'). relu/jumprelu SAEs return at most k features per token
    (default min(d_sae, 256)). Options saehook does not compute exactly are refused.
    """
    cfg = _read_cfg(folder)
    wpath = os.path.join(folder, "sae_weights.safetensors")
    tensors, dtypes, _ = _read_safetensors(wpath)
    meta_cfg = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}

    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    cfg_k = cfg.get("k")
    if act_fn == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
        arch, cfg_k = "topk", cfg["activation_fn_kwargs"]["k"]  # pre-6.0 TopK SAEs
    elif act_fn not in (None, "relu"):
        raise SAEFormatError(f"{folder}: activation_fn={act_fn!r} is not supported (SAELens's ReLU and TopK are)")
    if arch not in _SAELENS_ACTIVATIONS:
        raise SAEFormatError(f"{folder}: SAELens architecture {arch!r} is not supported "
                             f"(supported: {', '.join(sorted(_SAELENS_ACTIVATIONS))})")
    norm = cfg.get("normalize_activations")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    if norm != "none":
        raise SAEFormatError(f"{folder}: normalize_activations={norm!r} is not supported: saehook does not "
                             f"rescale its inputs; only SAEs trained on raw activations ('none') load")
    if "scaling_factor" in tensors and not np.all(_f32(tensors["scaling_factor"], dtypes["scaling_factor"]) == 1):
        raise SAEFormatError(f"{wpath}: a finetuning scaling_factor other than 1 is not supported")

    need = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    _need(tensors, need, wpath)
    d_in, d_sae = _matrix(tensors["W_enc"], "W_enc", "(d_in, d_sae)", wpath)
    shapes = {"W_dec": (tensors["W_dec"].shape, (d_sae, d_in)), "b_enc": (tensors["b_enc"].shape, (d_sae,)),
              "b_dec": (tensors["b_dec"].shape, (d_in,))}
    if arch == "jumprelu":
        shapes["threshold"] = (tensors["threshold"].shape, (d_sae,))
    _shape_check(wpath, shapes)
    for key, actual in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and int(cfg[key]) != actual:
            raise SAEFormatError(f"{folder}: cfg.json says {key}={cfg[key]} but {wpath} has {actual}")

    if arch == "topk":
        k = k or int(cfg_k if cfg_k is not None else 100)  # 100: TopKSAEConfig's default
    else:
        k = k or min(d_sae, DEFAULT_CAP)
    hook = meta_cfg.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if layer is None:
        layer = _last_int(_LAYER_IN_HOOK, hook)
    meta = {"format": "saelens", "hook_point": hook, "layer": layer, "source": folder,
            "model": meta_cfg.get("model_name") or cfg.get("model_name")}
    if cfg.get("reshape_activations") == "hook_z" or (hook or "").endswith("hook_z"):
        meta["input"] = "hook_z flattened: (..., n_heads * d_head)"

    W_enc = np.ascontiguousarray(tensors["W_enc"].T)  # the one copy: feature-major for the kernels
    W_dec, b_enc = tensors["W_dec"], _f32(tensors["b_enc"], dtypes["b_enc"])
    etag, dtag = st.tag_of(dtypes["W_enc"]), st.tag_of(dtypes["W_dec"])
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        folded = _fold_decoder_norms(W_enc, dtypes["W_enc"], b_enc, W_dec, dtypes["W_dec"])
        if folded is not None:
            (W_enc, b_enc, W_dec), etag, dtag = folded, "f32", "f32"
    return _make(folder, lambda: SAE(
        W_enc, W_dec, b_enc, _f32(tensors["b_dec"], dtypes["b_dec"]), k=k, activation=_SAELENS_ACTIVATIONS[arch],
        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
        threshold=_f32(tensors["threshold"], dtypes["threshold"]) if arch == "jumprelu" else None,
        dec_layout="rows", enc_dtype=etag, dec_dtype=dtag, metadata=meta))


def _fold_decoder_norms(W_enc, enc_st: str, b_enc, W_dec, dec_st: str):
    """SAELens TopK with rescale_acts_by_decoder_norm ranks pre * |d_f| and decodes
    acts / |d_f|: the same SAE as W_enc_f * |d_f|, b_enc_f * |d_f|, d_f / |d_f| (SAELens's own
    _fold_norm_topk), returned as float32 copies. SAELens folds this when it saves an inference
    SAE, so the norms are usually 1 already: within 1e-6 (below the float32 accuracy of the
    result) this returns None and W_dec stays mapped."""
    W_dec = _f32(W_dec, dec_st)
    norms = np.linalg.norm(W_dec.astype(np.float64), axis=1)
    if np.all(np.abs(norms - 1) <= 1e-6):
        return None
    # A zero decoder row: SAELens would divide 0 by 0; as the limit, the feature never fires.
    safe = np.where(norms > 0, norms, 1.0)
    return ((_f32(W_enc, enc_st) * norms[:, None]).astype(np.float32), (b_enc * norms).astype(np.float32),
            (W_dec / safe[:, None]).astype(np.float32))


# ---------------- EleutherAI sparsify ----------------
def _load_sparsify(folder: str, k: Optional[int], layer: Optional[int]) -> SAE:
    """A sparsify folder (one per hook point): cfg.json + sae.safetensors with encoder.weight
    (d_sae, d_in), encoder.bias, W_dec (d_sae, d_in), b_dec.

    As sparsify's SparseCoder.encode / fused_encoder compute it: relu((x - b_dec) @ W.T + b),
    then the k largest (activation 'topk_relu', subtract_b_dec); x_hat = acts @ W_dec + b_dec.
    Both matrices are already feature-major: zero copy. Transcoders, skip connections and the
    groupmax / signed / PKM variants compute something else and are refused.
    """
    cfg = _read_cfg(folder)
    wpath = os.path.join(folder, "sae.safetensors")
    tensors, dtypes, _ = _read_safetensors(wpath)
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{folder}: sparsify activation {cfg['activation']!r} is not supported; only 'topk'")
    for flag, what in (("transcode", "transcoders (they predict another hook point)"),
                       ("skip_connection", "skip connections (W_skip)"), ("signed", "signed SAEs"),
                       ("encoder_pkm", "product-key-memory encoders"), ("encoder_halut", "lookup-table encoders")):
        if cfg.get(flag):
            raise SAEFormatError(f"{folder}: sparsify {what} are not supported ({flag}=true)")
    _need(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], wpath)
    d_sae, d_in = _matrix(tensors["encoder.weight"], "encoder.weight", "(d_sae, d_in)", wpath)
    _shape_check(wpath, {"W_dec": (tensors["W_dec"].shape, (d_sae, d_in)),
                         "encoder.bias": (tensors["encoder.bias"].shape, (d_sae,)),
                         "b_dec": (tensors["b_dec"].shape, (d_in,))})
    if "d_in" in cfg and int(cfg["d_in"]) != d_in:
        raise SAEFormatError(f"{folder}: cfg.json says d_in={cfg['d_in']} but {wpath} has {d_in}")
    # sparsify: num_latents, or d_in * expansion_factor when num_latents is 0.
    want_latents = cfg.get("num_latents") or (d_in * int(cfg["expansion_factor"]) if "expansion_factor" in cfg else d_sae)
    if int(want_latents) != d_sae:
        raise SAEFormatError(f"{folder}: cfg.json implies {want_latents} latents but {wpath} has {d_sae}")
    k = k or int(cfg.get("k", 32))  # 32: SparseCoderConfig's default
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
    """sparsify's training run writes config.json (with the model name) next to the folders."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(folder)), "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


# ---------------- Gemma Scope ----------------
def _npz_arrays(path: str) -> Dict[str, np.ndarray]:
    """The arrays of an .npz. Members stored uncompressed (np.savez) are memory-mapped at their
    data offset; compressed ones (np.savez_compressed) are read. Object arrays are refused
    (never unpickled)."""
    out: Dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                if info.compress_type != zipfile.ZIP_STORED:
                    with z.open(info) as f:
                        out[name] = np.lib.format.read_array(f, allow_pickle=False)
                    continue
                # Local file header: 30 fixed bytes, then the name and an extra field whose
                # lengths (offsets 26, 28) may differ from the central directory's copy.
                raw.seek(info.header_offset)
                local = raw.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise SAEFormatError(f"{path}: corrupt zip entry {info.filename}")
                start = (info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                         + int.from_bytes(local[28:30], "little"))
                raw.seek(start)
                version = np.lib.format.read_magic(raw)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise SAEFormatError(f"{path}: {info.filename} has unsupported .npy version {version}")
                shape, fortran, dt = read_header(raw)
                if dt.hasobject:
                    raise SAEFormatError(f"{path}: {name} holds Python objects; refused")
                nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                if raw.tell() - start + nbytes != info.file_size:
                    raise SAEFormatError(f"{path}: {name} has shape {shape} ({nbytes} bytes of {dt}) but its "
                                         f"zip entry holds {info.file_size - (raw.tell() - start)} data bytes")
                out[name] = (np.memmap(path, dtype=dt, mode="r", offset=raw.tell(), shape=shape,
                                       order="F" if fortran else "C") if nbytes else np.zeros(shape, dt))
    except SAEFormatError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SAEFormatError(f"{path}: cannot be read as an .npz archive ({type(e).__name__}: {e})") from None
    return out


def _load_gemmascope(path: str, k: Optional[int], layer: Optional[int]) -> SAE:
    """Gemma Scope's params.npz: W_enc (d_model, d_sae), W_dec (d_sae, d_model), b_enc, b_dec,
    threshold. JumpReLU as Gemma Scope defines it: pre = x @ W_enc + b_enc,
    acts = pre * (pre > threshold) (the thresholds are positive, so this is saehook's jumprelu);
    no b_dec subtraction; x_hat = acts @ W_dec + b_dec.

    W_enc is transposed into one float32 copy; W_dec stays mapped when the archive stores it
    uncompressed. At most k features per token are returned (default min(d_sae, 256)).
    """
    arrs = _npz_arrays(path)
    for low in ("w_enc", "w_dec"):  # some releases spell the matrices in lower case (as SAELens handles)
        if low in arrs and "W" + low[1:] not in arrs:
            arrs["W" + low[1:]] = arrs.pop(low)
    _need(arrs, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], path)
    d_model, d_sae = _matrix(arrs["W_enc"], "W_enc", "(d_model, d_sae)", path)
    _shape_check(path, {"W_dec": (arrs["W_dec"].shape, (d_sae, d_model)), "b_enc": (arrs["b_enc"].shape, (d_sae,)),
                        "b_dec": (arrs["b_dec"].shape, (d_model,)),
                        "threshold": (arrs["threshold"].shape, (d_sae,))})
    if np.any(np.asarray(arrs["threshold"]) < 0):  # then pre * (pre > threshold) keeps negative values
        raise SAEFormatError(f"{path}: negative JumpReLU thresholds are not supported (Gemma Scope's are positive)")
    full = os.path.abspath(path)
    # Gemma Scope's layout: <release>/layer_<n>/width_<w>/average_l0_<l0>/params.npz
    meta = {"format": "gemma-scope", "hook_point": "resid_post", "source": path,
            "layer": layer if layer is not None else _last_int(_LAYER_IN_NAME, full)}
    l0 = _last_int(_L0_IN_PATH, full)
    if l0 is not None:
        meta["average_l0"] = l0
    W_dec = arrs["W_dec"]
    if W_dec.dtype not in (np.float32, np.float16):
        W_dec = W_dec.astype(np.float32)
    return _make(path, lambda: SAE(
        np.ascontiguousarray(arrs["W_enc"].T, dtype=np.float32), W_dec, arrs["b_enc"], arrs["b_dec"],
        threshold=arrs["threshold"], k=k or min(d_sae, DEFAULT_CAP), activation="jumprelu",
        dec_layout="rows", metadata=meta))


# ---------------- saehook's own format ----------------
# __metadata__ (all strings): format="saehook", format_version, activation, k, subtract_b_dec
# ("true"/"false"), dec_layout, hook_point, model, layer ("" when unknown), and info: a JSON
# object with the rest of SAE.metadata. Tensors: W_enc (f32/f16/bf16/int8, (d_sae, d_model)),
# enc_scales (f32, int8 encoders only), W_dec (f32/f16/bf16, rows or cols), and optionally
# b_enc, b_dec, threshold (f32).
def _load_saehook(path: str, k: Optional[int], layer: Optional[int]) -> SAE:
    tensors, dtypes, meta = _read_safetensors(path)
    if meta.get("format") != "saehook":
        hint = ""
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.exists(os.path.join(parent, "cfg.json")):
            hint = f"; SAELens and sparsify SAEs load from their directory: saehook.load({parent!r})"
        raise SAEFormatError(f"{path}: a .safetensors file without saehook metadata{hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SAEFormatError(f"{path}: saehook format version {meta.get('format_version')!r} is not supported "
                             f"(this saehook reads version {FORMAT_VERSION})")
    activation, dec_layout = meta.get("activation"), meta.get("dec_layout", "rows")
    if activation not in ACTIVATIONS or dec_layout not in DEC_LAYOUTS:
        raise SAEFormatError(f"{path}: bad metadata activation={activation!r} dec_layout={dec_layout!r}")
    try:
        k = k or int(meta["k"])
        info = json.loads(meta.get("info") or "{}")
        saved_layer = int(meta["layer"]) if meta.get("layer") else None
    except (KeyError, ValueError) as e:
        raise SAEFormatError(f"{path}: bad or missing metadata ({type(e).__name__}: {e})") from None
    _need(tensors, ["W_enc", "W_dec"] + (["enc_scales"] if dtypes.get("W_enc") == "I8" else []), path)
    etag, dtag = st.tag_of(dtypes["W_enc"]), st.tag_of(dtypes["W_dec"])
    if etag is None or dtag is None:
        raise SAEFormatError(f"{path}: unsupported weight dtypes W_enc {dtypes['W_enc']}, W_dec {dtypes['W_dec']}")
    out_meta = dict(info) if isinstance(info, dict) else {}
    out_meta.update({"format": "saehook", "source": path, "layer": layer if layer is not None else saved_layer,
                     "hook_point": meta.get("hook_point") or None, "model": meta.get("model") or None})
    return _make(path, lambda: SAE(
        tensors["W_enc"], tensors["W_dec"], tensors.get("b_enc"), tensors.get("b_dec"), k=k,
        activation=activation, subtract_b_dec=meta.get("subtract_b_dec") == "true",
        threshold=tensors.get("threshold"), dec_layout=dec_layout, enc_scales=tensors.get("enc_scales"),
        enc_dtype=etag, dec_dtype=dtag, metadata=out_meta))


def save_saehook(sae: SAE, path: Any, *, dec_layout: str = "rows") -> None:
    """Writes `sae` in saehook's format: one .safetensors file that loads memory-mapped.

    dec_layout='rows' stores W_dec feature-major (transposing a column-major decoder such as
    Qwen-Scope's), the fast layout for decode. Written atomically (temp file + os.replace).
    """
    if dec_layout not in DEC_LAYOUTS:
        raise ValueError(f"dec_layout must be 'rows' or 'cols', got {dec_layout!r}")
    a = sae.arrays()
    W_dec = a["W_dec"] if sae.dec_layout == dec_layout else np.ascontiguousarray(a["W_dec"].T)
    tensors = {"W_enc": (a["W_enc"], sae.enc_dtype), "W_dec": (W_dec, sae.dec_dtype)}
    for name in ("enc_scales", "b_enc", "b_dec", "threshold"):
        if a[name] is not None:
            tensors[name] = (a[name], "f32")
    reserved = {"format", "source", "layer", "hook_point", "model"}
    info = {key: val for key, val in sae.metadata.items()
            if key not in reserved and isinstance(val, (str, int, float, bool, type(None)))}
    meta = {"format": "saehook", "format_version": FORMAT_VERSION, "activation": sae.activation, "k": str(sae.k),
            "subtract_b_dec": "true" if sae.subtract_b_dec else "false", "dec_layout": dec_layout,
            "hook_point": str(sae.hook_point or ""), "model": str(sae.metadata.get("model") or ""),
            "layer": "" if sae.layer is None else str(sae.layer), "info": json.dumps(info)}
    st.write(os.fspath(path), tensors, meta)
