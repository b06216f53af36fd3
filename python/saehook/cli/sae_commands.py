"""`saehook info` and `saehook convert`: an SAE file on its own."""
from __future__ import annotations

import json
import os


def describe(sae) -> dict:
    """What `info` prints. "mapped" lists the arrays read in place from a memory-mapped file
    (looked up now, not taken from metadata) and "mapped_from" names that file: truncating or
    rewriting it in place while the SAE is in use ends the process with SIGBUS (README "Memory")."""
    from ..formats import mapped_tensors
    from ..formats._files import mapped_file

    mapped = mapped_tensors(sae)
    out = {
        "d_model": sae.d_model, "d_sae": sae.d_sae, "k": sae.k, "activation": sae.activation,
        "subtract_b_dec": sae.subtract_b_dec, "enc_dtype": sae.enc_dtype, "dec_dtype": sae.dec_dtype,
        "dec_layout": sae.dec_layout, "weight_bytes": sae.weight_bytes, **{
            k: v for k, v in sae.metadata.items() if isinstance(v, (str, int, float, bool))},
        "mapped": mapped,
    }
    if mapped:
        out["mapped_from"] = ", ".join(sorted({mapped_file(sae.arrays()[n]) for n in mapped}))
    return out


def cmd_info(args) -> int:
    from .. import load
    from ..formats import SAESet

    obj = load(args.sae, k=args.k, layer=args.layer)
    saes = dict(obj.items()) if isinstance(obj, SAESet) else {obj.layer: obj}
    info = {str(layer): describe(s) for layer, s in saes.items()}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for layer, d in info.items():
            print(f"layer {layer}:")
            for key, val in d.items():
                if key == "weight_bytes":
                    val = f"{val / 2**20:.1f} MiB"
                elif key == "mapped":
                    val = (f"{', '.join(val)} (memory-mapped: do not truncate or rewrite the file in place while "
                           f"it is in use)") if val else "no (weights in memory)"
                print(f"  {key:>15}: {val}")
    return 0


def cmd_convert(args) -> int:
    from .. import load
    from ..formats import SAESet

    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):  # before loading: say so rather than fail on the temporary file's name
        raise FileNotFoundError(f"cannot write {args.out}: the folder {folder} does not exist")
    obj = load(args.sae, k=args.k, layer=args.layer)
    if isinstance(obj, SAESet):
        raise SystemExit("convert takes one layer: pass --layer N")
    obj.save(args.out, dtype=args.dtype)
    print(f"wrote {args.out} ({args.dtype or obj.enc_dtype} encoder)")
    return 0


def register(sub) -> None:
    i = sub.add_parser("info", help="format, shapes, k, activation, dtypes and memory of an SAE")
    i.add_argument("sae", help="an SAE file or folder, any format saehook loads")
    i.add_argument("--k", type=int, help="features per token, where the file does not say (Qwen-Scope: from the release name)")
    i.add_argument("--layer", type=int, help="one layer of a folder holding several (default: all)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(fn=cmd_info)
    c = sub.add_parser("convert", help="write an SAE in saehook's own mmappable format")
    c.add_argument("sae", help="an SAE file or folder, any format saehook loads")
    c.add_argument("out", help="the .safetensors file to write")
    c.add_argument("--dtype", choices=["f32", "f16", "bf16", "int8"],
                   help="convert the weights (int8: quantized encoder, 4x fewer bytes per token; default: as loaded)")
    c.add_argument("--k", type=int, help="features per token, where the file does not say")
    c.add_argument("--layer", type=int, help="which layer of a folder holding several")
    c.set_defaults(fn=cmd_convert)
