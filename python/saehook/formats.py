"""Loaders for the published SAE formats, detected from the path, and saehook's own format.

| format          | what the path is                                  | activation            |
|-----------------|---------------------------------------------------|-----------------------|
| Qwen-Scope      | `layer{n}.sae.pt` (or a directory of them)        | topk                  |
| SAELens         | directory with cfg.json + sae_weights.safetensors | relu/topk_relu/jumprelu|
| Gemma Scope     | params.npz (or a directory holding it)            | jumprelu              |
| sparsify        | directory with cfg.json + sae.safetensors         | topk_relu, x - b_dec  |
| saehook         | one .safetensors file with saehook metadata       | any                   |

Weights stay where the file puts them (mmapped) except where a format stores the encoder
input-major (SAELens, Gemma Scope): that W_enc is transposed once into an owned copy.
`.pt` files are read with torch.load(weights_only=True) only: a pickle that holds anything but
tensors is refused, never executed.
"""
from __future__ import annotations

import collections.abc
import json
import os
import re
import zipfile
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from . import safetensors_io as st
from .sae import SAE

FORMAT_VERSION = "1"
_K_FROM_NAME = re.compile(r"L0[_-](\d+)")
_LAYER_FILE = re.compile(r"layer[_-]?(\d+)")
_LAYER_IN_HOOK = re.compile(r"(?:blocks|layers|layer|h)[._](\d+)")


class SAEFormatError(ValueError):
    """A file that is not a loadable SAE: the message names the file and the problem."""


class SAESet(collections.abc.Mapping):
    """SAEs of several layers of one release, keyed by layer."""

    def __init__(self, saes: Dict[int, SAE], source: str = ""):
        self._saes = dict(sorted(saes.items()))
        self.source = source

    def __getitem__(self, layer: int) -> SAE:
        try:
            return self._saes[int(layer)]
        except KeyError:
            raise KeyError(f"no SAE for layer {layer} in {self.source or 'this set'}; layers: {self.layers}") from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._saes)

    def __len__(self) -> int:
        return len(self._saes)

    @property
    def layers(self) -> List[int]:
        return list(self._saes)

    def __repr__(self) -> str:
        first = next(iter(self._saes.values()), None)
        return f"SAESet(layers={self.layers}, {first!r})"


def load(path: str, *, k: Optional[int] = None, layer: Optional[int] = None,
         dtype: Optional[str] = None):
    """Loads an SAE (or an SAESet for a directory of layers) in any supported format.

    k: active features per token (required for Qwen-Scope when the release directory name does
    not carry it; for relu/jumprelu SAEs, the cap on returned features, default min(d_sae, 256)).
    layer: pick one layer of a multi-layer directory, or set the layer of a single file.
    dtype: convert after loading (SAE.to_dtype): 'int8' quantizes the encoder.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SAEFormatError(f"{path}: no such file or directory")
    obj = _dispatch(path, k, layer)
    if dtype is not None:
        if isinstance(obj, SAESet):
            obj = SAESet({lay: s.to_dtype(dtype) for lay, s in obj.items()}, obj.source)
        else:
            obj = obj.to_dtype(dtype)
    return obj


def _dispatch(path: str, k, layer):
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if "cfg.json" in names and "sae_weights.safetensors" in names:
            return _load_saelens(path, k, layer)
        if "cfg.json" in names and "sae.safetensors" in names:
            return _load_sparsify(path, k, layer)
        if "params.npz" in names:
            return _load_gemmascope(os.path.join(path, "params.npz"), k, layer)
        pts = sorted(n for n in names if n.endswith((".sae.pt", ".pt", ".pth")) and _LAYER_FILE.search(n))
        if pts:
            saes = {int(_LAYER_FILE.search(n).group(1)): os.path.join(path, n) for n in pts}
            if layer is not None:
                if int(layer) not in saes:
                    raise SAEFormatError(f"{path}: no layer {layer}; layers present: {sorted(saes)}")
                return _load_qwenscope(saes[int(layer)], k, int(layer))
            return SAESet({lay: _load_qwenscope(p, k, lay) for lay, p in saes.items()}, path)
        subs = sorted(n for n in names if os.path.isdir(os.path.join(path, n))
                      and os.path.exists(os.path.join(path, n, "cfg.json")))
        if subs:  # a sparsify/SAELens release: one folder per hook point
            saes = {}
            for n in subs:
                m = _LAYER_IN_HOOK.search(n)
                if m is None:
                    continue
                saes[int(m.group(1))] = os.path.join(path, n)
            if saes:
                if layer is not None:
                    if int(layer) not in saes:
                        raise SAEFormatError(f"{path}: no layer {layer}; layers present: {sorted(saes)}")
                    return _dispatch(saes[int(layer)], k, None)
                return SAESet({lay: _dispatch(p, k, None) for lay, p in saes.items()}, path)
        raise SAEFormatError(
            f"{path}: unknown SAE directory: expected cfg.json with sae_weights.safetensors (SAELens) or "
            f"sae.safetensors (sparsify), params.npz (Gemma Scope), or layer*.sae.pt files (Qwen-Scope)")
    lower = path.lower()
    if lower.endswith((".pt", ".pth")):
        return _load_qwenscope(path, k, layer)
    if lower.endswith(".safetensors"):
        return _load_saehook(path, k, layer)
    if lower.endswith(".npz"):
        return _load_gemmascope(path, k, layer)
    raise SAEFormatError(f"{path}: unknown SAE format (expected .pt, .safetensors, .npz or an SAE directory)")


def _need(tensors: Dict[str, Any], names, path: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(f"{path}: missing tensor(s) {', '.join(missing)} (has: {', '.join(sorted(tensors)) or 'none'})")


def _shape_check(path: str, **shapes) -> None:
    bad = {n: (tuple(got), tuple(want)) for n, (got, want) in shapes.items() if tuple(got) != tuple(want)}
    if bad:
        desc = "; ".join(f"{n} is {g}, expected {w}" for n, (g, w) in bad.items())
        raise SAEFormatError(f"{path}: inconsistent shapes: {desc}")


def _make(path: str, fn):
    """Builds the SAE, turning the constructor's ValueErrors into format errors naming the file."""
    try:
        return fn()
    except SAEFormatError:
        raise
    except (ValueError, TypeError) as e:
        raise SAEFormatError(f"{path}: {e}") from None


# ---------------- Qwen-Scope ----------------
def _load_qwenscope(path: str, k, layer) -> SAE:
    try:
        import torch
    except ImportError:
        raise SAEFormatError(f"{path}: reading .pt files needs torch (pip install 'saehook[torch]')") from None
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only legacy (non-zip) files cannot be mmapped
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, truncated zip, bad magic, ...
        raise SAEFormatError(f"{path}: cannot be read as a tensor checkpoint with weights_only=True "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(sd, dict):
        raise SAEFormatError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    _need(sd, ["W_enc", "W_dec", "b_enc", "b_dec"], path)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if not isinstance(sd[name], torch.Tensor):
            raise SAEFormatError(f"{path}: {name} is a {type(sd[name]).__name__}, not a tensor")
    W_enc, W_dec = sd["W_enc"], sd["W_dec"]
    if W_enc.dim() != 2:
        raise SAEFormatError(f"{path}: W_enc must be 2-D (d_sae, d_model), got {tuple(W_enc.shape)}")
    d_sae, d_model = W_enc.shape
    _shape_check(path, W_dec=(W_dec.shape, (d_model, d_sae)), b_enc=(sd["b_enc"].shape, (d_sae,)),
                 b_dec=(sd["b_dec"].shape, (d_model,)))
    if k is None:
        m = _K_FROM_NAME.search(os.path.abspath(path))
        if m is None:
            raise SAEFormatError(f"{path}: Qwen-Scope files do not store k; pass k= (the release name's L0_<k>, "
                                 f"e.g. SAE-Res-Qwen3.5-9B-Base-W64K-L0_100 means k=100)")
        k = int(m.group(1))
    if layer is None:
        m = _LAYER_FILE.search(os.path.basename(path))
        layer = int(m.group(1)) if m else None
    release = os.path.basename(os.path.dirname(os.path.abspath(path)))
    model = re.match(r"SAE-Res-(.+?)-W\d+K", release)
    meta = {"format": "qwen-scope", "layer": layer, "hook_point": "resid_post", "source": path}
    if model:
        meta["model"] = model.group(1)
    return _make(path, lambda: SAE(W_enc.contiguous(), W_dec.contiguous(), sd["b_enc"], sd["b_dec"], k=int(k),
                                   activation="topk", dec_layout="cols", metadata=meta, keepalive=sd))


# ---------------- SAELens ----------------
def _read_cfg(path: str) -> dict:
    cfg_path = os.path.join(path, "cfg.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{cfg_path}: cannot read the config ({e})") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{cfg_path}: expected a JSON object")
    return cfg


def _read_safetensors(path: str):
    try:
        return st.read(path)
    except (st.SafetensorsError, OSError) as e:
        raise SAEFormatError(str(e)) from None


def _layer_of_hook(hook: Optional[str], layer):
    if layer is not None or not hook:
        return layer
    m = _LAYER_IN_HOOK.search(hook)
    return int(m.group(1)) if m else None


def _load_saelens(path: str, k, layer) -> SAE:
    cfg = _read_cfg(path)
    wpath = os.path.join(path, "sae_weights.safetensors")
    tensors, dtypes, _ = _read_safetensors(wpath)
    arch = cfg.get("architecture", "standard")
    acts = {"standard": "relu", "topk": "topk_relu", "jumprelu": "jumprelu"}
    if arch not in acts:
        raise SAEFormatError(f"{path}: SAELens architecture {arch!r} is not supported (supported: {sorted(acts)})")
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none"):
        raise SAEFormatError(f"{path}: normalize_activations={norm!r} is not supported; only 'none'")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise SAEFormatError(f"{path}: rescale_acts_by_decoder_norm=True is not supported")
    need = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    _need(tensors, need, wpath)
    W_enc = tensors["W_enc"]
    if W_enc.ndim != 2:
        raise SAEFormatError(f"{wpath}: W_enc must be 2-D (d_in, d_sae), got {W_enc.shape}")
    d_in, d_sae = W_enc.shape
    _shape_check(wpath, W_dec=(tensors["W_dec"].shape, (d_sae, d_in)), b_enc=(tensors["b_enc"].shape, (d_sae,)),
                 b_dec=(tensors["b_dec"].shape, (d_in,)),
                 **({"threshold": (tensors["threshold"].shape, (d_sae,))} if arch == "jumprelu" else {}))
    for key, want in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and int(cfg[key]) != want:
            raise SAEFormatError(f"{path}: cfg.json says {key}={cfg[key]} but the weights have {want}")
    if arch == "topk":
        k = k or cfg.get("k")
        if k is None:
            raise SAEFormatError(f"{path}: topk SAE without k in cfg.json; pass k=")
    else:
        k = k or min(d_sae, 256)
    hook = cfg.get("hook_name")
    meta = {"format": "saelens", "hook_point": hook, "layer": _layer_of_hook(hook, layer), "source": path,
            "model": cfg.get("model_name")}
    etag, dtag = st.tag_of(dtypes["W_enc"]), st.tag_of(dtypes["W_dec"])
    return _make(path, lambda: SAE(
        np.ascontiguousarray(W_enc.T), tensors["W_dec"], _f32(tensors["b_enc"], dtypes["b_enc"]),
        _f32(tensors["b_dec"], dtypes["b_dec"]), k=int(k), activation=acts[arch],
        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", False)),
        threshold=_f32(tensors["threshold"], dtypes["threshold"]) if arch == "jumprelu" else None,
        dec_layout="rows", enc_dtype=etag, dec_dtype=dtag, metadata=meta))


def _f32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    """A small vector as float32 (bf16 bits widened)."""
    if st_dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


# ---------------- EleutherAI sparsify ----------------
def _load_sparsify(path: str, k, layer) -> SAE:
    cfg = _read_cfg(path)
    wpath = os.path.join(path, "sae.safetensors")
    tensors, dtypes, _ = _read_safetensors(wpath)
    if cfg.get("transcode"):
        raise SAEFormatError(f"{path}: sparsify transcoders are not supported (they map one hook point to another)")
    if cfg.get("skip_connection"):
        raise SAEFormatError(f"{path}: sparsify skip connections (W_skip) are not supported")
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{path}: sparsify activation {cfg.get('activation')!r} is not supported; only 'topk'")
    _need(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], wpath)
    W_enc = tensors["encoder.weight"]
    if W_enc.ndim != 2:
        raise SAEFormatError(f"{wpath}: encoder.weight must be 2-D (d_sae, d_in), got {W_enc.shape}")
    d_sae, d_in = W_enc.shape
    _shape_check(wpath, W_dec=(tensors["W_dec"].shape, (d_sae, d_in)), **{
        "encoder.bias": (tensors["encoder.bias"].shape, (d_sae,)), "b_dec": (tensors["b_dec"].shape, (d_in,))})
    if "d_in" in cfg and int(cfg["d_in"]) != d_in:
        raise SAEFormatError(f"{path}: cfg.json says d_in={cfg['d_in']} but the weights have {d_in}")
    k = k or cfg.get("k")
    if k is None:
        raise SAEFormatError(f"{path}: no k in cfg.json; pass k=")
    hook = os.path.basename(os.path.abspath(path))
    meta = {"format": "sparsify", "hook_point": hook, "layer": _layer_of_hook(hook, layer), "source": path}
    return _make(path, lambda: SAE(
        W_enc, tensors["W_dec"], _f32(tensors["encoder.bias"], dtypes["encoder.bias"]),
        _f32(tensors["b_dec"], dtypes["b_dec"]), k=int(k), activation="topk_relu", subtract_b_dec=True,
        dec_layout="rows", enc_dtype=st.tag_of(dtypes["encoder.weight"]), dec_dtype=st.tag_of(dtypes["W_dec"]),
        metadata=meta))


# ---------------- Gemma Scope ----------------
def _npz_arrays(path: str) -> Dict[str, np.ndarray]:
    """Arrays of an .npz; members stored uncompressed are memory-mapped, not read."""
    out: Dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                if info.compress_type == zipfile.ZIP_STORED:
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    if local[:4] != b"PK\x03\x04":
                        raise SAEFormatError(f"{path}: corrupt zip entry {info.filename}")
                    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
                    raw.seek(start)
                    version = np.lib.format.read_magic(raw)
                    shape, fortran, dt = (np.lib.format.read_array_header_1_0(raw) if version == (1, 0)
                                          else np.lib.format.read_array_header_2_0(raw))
                    if dt.hasobject:
                        raise SAEFormatError(f"{path}: {name} holds Python objects; refused")
                    out[name] = np.memmap(path, dtype=dt, mode="r", offset=raw.tell(), shape=shape,
                                          order="F" if fortran else "C")
                else:
                    with z.open(info) as f:
                        out[name] = np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        if isinstance(e, SAEFormatError):
            raise
        raise SAEFormatError(f"{path}: cannot be read as an .npz archive ({e})") from None
    return out


def _load_gemmascope(path: str, k, layer) -> SAE:
    arrs = _npz_arrays(path)
    _need(arrs, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], path)
    W_enc = arrs["W_enc"]
    if W_enc.ndim != 2:
        raise SAEFormatError(f"{path}: W_enc must be 2-D (d_model, d_sae), got {W_enc.shape}")
    d_model, d_sae = W_enc.shape
    _shape_check(path, W_dec=(arrs["W_dec"].shape, (d_sae, d_model)), b_enc=(arrs["b_enc"].shape, (d_sae,)),
                 b_dec=(arrs["b_dec"].shape, (d_model,)), threshold=(arrs["threshold"].shape, (d_sae,)))
    if layer is None:
        m = _LAYER_FILE.search(os.path.abspath(path))
        layer = int(m.group(1)) if m else None
    meta = {"format": "gemma-scope", "layer": layer, "hook_point": "resid_post", "source": path}
    return _make(path, lambda: SAE(
        np.ascontiguousarray(W_enc.T, dtype=np.float32), arrs["W_dec"].astype(np.float32, copy=False),
        arrs["b_enc"], arrs["b_dec"], threshold=arrs["threshold"], k=int(k or min(d_sae, 256)),
        activation="jumprelu", dec_layout="rows", metadata=meta))


# ---------------- saehook's own format ----------------
def _load_saehook(path: str, k, layer) -> SAE:
    tensors, dtypes, meta = _read_safetensors(path)
    if meta.get("format") != "saehook":
        raise SAEFormatError(f"{path}: a .safetensors file without saehook metadata; SAELens and sparsify "
                             f"SAEs are loaded from their directory (with cfg.json)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SAEFormatError(f"{path}: saehook format version {meta.get('format_version')!r} is not supported "
                             f"(this saehook reads version {FORMAT_VERSION})")
    _need(tensors, ["W_enc", "W_dec"], path)
    etag, dtag = st.tag_of(dtypes["W_enc"]), st.tag_of(dtypes["W_dec"])
    if etag is None or dtag is None:
        raise SAEFormatError(f"{path}: unsupported weight dtypes {dtypes['W_enc']}/{dtypes['W_dec']}")
    if etag == "int8":
        _need(tensors, ["enc_scales"], path)
    info = json.loads(meta.get("info", "{}"))
    out_meta = {key: val for key, val in info.items()}
    out_meta["format"] = "saehook"
    out_meta["source"] = path
    if layer is not None:
        out_meta["layer"] = layer
    opt = lambda name: tensors.get(name)  # noqa: E731
    return _make(path, lambda: SAE(
        tensors["W_enc"], tensors["W_dec"], opt("b_enc"), opt("b_dec"), k=int(k or meta["k"]),
        activation=meta["activation"], subtract_b_dec=meta.get("subtract_b_dec") == "true",
        threshold=opt("threshold"), dec_layout=meta.get("dec_layout", "rows"), enc_scales=opt("enc_scales"),
        enc_dtype=etag, dec_dtype=dtag, metadata=out_meta))


def save_saehook(sae: SAE, path: str, *, dec_layout: str = "rows") -> None:
    """Writes saehook's format: one .safetensors file, mmapped on load."""
    if dec_layout not in ("rows", "cols"):
        raise ValueError(f"dec_layout must be 'rows' or 'cols', got {dec_layout!r}")
    a = sae.arrays()
    W_dec = a["W_dec"] if sae.dec_layout == dec_layout else np.ascontiguousarray(a["W_dec"].T)
    tensors = {"W_enc": (a["W_enc"], sae.enc_dtype), "W_dec": (W_dec, sae.dec_dtype)}
    for name in ("enc_scales", "b_enc", "b_dec", "threshold"):
        if a[name] is not None:
            tensors[name] = (a[name], "f32")
    info = {key: val for key, val in sae.metadata.items()
            if key not in ("format", "source") and isinstance(val, (str, int, float, bool, type(None)))}
    meta = {"format": "saehook", "format_version": FORMAT_VERSION, "activation": sae.activation, "k": str(sae.k),
            "subtract_b_dec": "true" if sae.subtract_b_dec else "false", "dec_layout": dec_layout,
            "hook_point": str(sae.hook_point or ""), "model": str(sae.metadata.get("model") or ""),
            "layer": "" if sae.layer is None else str(sae.layer), "info": json.dumps(info)}
    st.write(path, tensors, meta)
