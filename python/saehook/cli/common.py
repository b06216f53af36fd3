"""What the command modules share: tables, progress bars, SAE loading and the steering flags."""
from __future__ import annotations

import sys
from typing import List, Optional


def print_table(columns: List[str], rows: List[list]) -> None:
    """A rich table on a terminal, aligned plain text otherwise (pipes, files)."""
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            t = Table(*columns)
            for r in rows:
                t.add_row(*[str(c) for c in r])
            Console().print(t)
            return
    widths = [max(len(str(c)) for c in [col] + [r[i] for r in rows]) for i, col in enumerate(columns)]
    for r in [columns] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


class Progress:
    """A progress bar on stderr (rich on a terminal, a counter line otherwise)."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.bar = label, total, None
        if sys.stderr.isatty():
            try:
                from rich.progress import Progress

                self.bar = Progress(transient=True)
                self.task = self.bar.add_task(label, total=total)
                self.bar.start()
            except ImportError:
                self.bar = None

    def __call__(self, done: int, note: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, description=f"{self.label} {note}")
        else:
            print(f"\r{self.label}: {done}/{self.total} {note}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        else:
            print(file=sys.stderr)


def load_one(path: str, layer: Optional[int], k: Optional[int]):
    from .. import load
    from ..formats import SAESet

    obj = load(path, k=k, layer=layer)
    if isinstance(obj, SAESet):
        raise ValueError(f"{path} holds layers {obj.layers}: pass --layer")
    if layer is not None:
        obj.metadata["layer"] = layer
    if obj.layer is None:
        raise ValueError(f"{path} does not say which layer it reads: pass --layer")
    return obj


def pairs(specs: List[str], flag: str, value_type=float):
    out = []
    for spec in specs or []:
        f, sep, v = spec.partition("=")
        if not sep:
            raise ValueError(f"{flag} expects FEATURE=VALUE, got {spec!r}")
        out.append((int(f), value_type(v)))
    return out


def _cap_bounds(spec: str):
    """'F=MAX', 'F=MIN:MAX', 'F=MIN:' or 'F=:MAX' -> (F, max, min)."""
    f, sep, v = spec.partition("=")
    lo, colon, hi = v.partition(":")
    if not colon:
        lo, hi = "", lo
    if not sep or not (lo or hi):
        raise ValueError(f"--cap expects FEATURE=MAX or FEATURE=MIN:MAX, got {spec!r}")
    return int(f), (float(hi) if hi else None), (float(lo) if lo else None)


def _positions(text: str):
    """'all' / 'prompt' / 'generated' / 'START:END' (END may be empty: no end)."""
    if ":" not in text:
        return text
    a, _, b = text.partition(":")
    try:
        return (int(a or 0), int(b) if b else None)
    except ValueError:
        raise ValueError(f"--positions expects all, prompt, generated or START:END, got {text!r}") from None


def steerings(sae, args):
    """The steerings of the flags, or of --spec FILE.json (then the flags must not add ops)."""
    if getattr(args, "spec", None):
        from ..steering_spec import load_spec

        if any(getattr(args, n, None) for n in ("add", "clamp", "scale", "ablate", "cap", "rescale")):
            raise ValueError("give either --spec or --add/--clamp/--scale/--ablate/--cap/--rescale, not both")
        return load_spec(args.spec, {sae.layer: sae})
    return [steering(sae, args)]


def steering(sae, args):
    from ..steering import Steering

    st = Steering(sae, layer=sae.layer, positions=_positions(args.positions), normalize=args.normalize)
    for f, v in pairs(args.add, "--add"):
        st.add(f, v)
    for f, v in pairs(args.clamp, "--clamp"):
        st.clamp(f, v)
    for f, v in pairs(args.scale, "--scale"):
        st.scale(f, v)
    for f in args.ablate or []:
        st.ablate(int(f))
    for spec in getattr(args, "cap", None) or []:
        f, hi, lo = _cap_bounds(spec)
        st.cap(f, max=hi, min=lo)
    for f, v in pairs(getattr(args, "rescale", None), "--rescale"):
        st.rescale(f, v)
    if not st.ops:
        raise ValueError("no intervention given: use --add/--clamp/--scale/--ablate/--cap/--rescale or --spec")
    return st


def add_steer_flags(p):
    p.add_argument("--add", action="append", metavar="F=S", help="h += S * d_F")
    p.add_argument("--clamp", action="append", metavar="F=V", help="set feature F's activation to V")
    p.add_argument("--scale", action="append", metavar="F=C", help="multiply feature F's activation by C")
    p.add_argument("--ablate", action="append", metavar="F", help="remove feature F")
    p.add_argument("--cap", action="append", metavar="F=MAX|F=MIN:MAX",
                   help="keep the projection on F's unit direction within [MIN, MAX] (either may be empty)")
    p.add_argument("--rescale", action="append", metavar="F=C", help="multiply the projection on F's unit direction by C")
    p.add_argument("--normalize", action="store_true", help="use unit-norm decoder directions")
    p.add_argument("--positions", default="all", metavar="all|prompt|generated|START:END",
                   help="tokens steered: all, prompt, generated, or absolute positions START <= pos < END")


def model_flags(p):
    p.add_argument("model", help="a GGUF file (llama.cpp) or a transformers model directory")
    p.add_argument("--engine", choices=["llama", "hf"], help="default: llama for a file, hf for a directory")
    p.add_argument("--sae", required=True)
    p.add_argument("--layer", type=int)
    p.add_argument("--k", type=int)
