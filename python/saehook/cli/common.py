"""What the command modules share: the parser class, argument types, tables, progress bars, SAE
loading and the steering flags."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default when it has one (unless
    the help already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and "(default" not in text and action.option_strings
                and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class CommandParser(argparse.ArgumentParser):
    """argparse with saehook's help layout (shown defaults), for the top level and every command."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


# ---- argument types: bad values are refused by argparse with the flag named ----
def _whole_number_at_least(text: str, low: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _whole_number_at_least(text, 1, "at least 1")


def nonnegative_int(text: str) -> int:
    return _whole_number_at_least(text, 0, "0 or more")


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return v


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    v = finite_float(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text!r}")
    return v


def unit_float(text: str) -> float:
    """A number from 0 to 1."""
    v = finite_float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return v


def check_feature(feature: int, sae, flag: str) -> int:
    """A feature index named on the command line, refused when the SAE has no such feature."""
    if not 0 <= int(feature) < sae.d_sae:
        raise IndexError(f"{flag} {feature}: the SAE has features 0 to {sae.d_sae - 1} (d_sae = {sae.d_sae})")
    return int(feature)


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

    # A single file is loaded as it is, so that the layer it records (metadata, or a Qwen-Scope
    # name) can be compared with --layer; a directory's --layer picks one of its layers.
    obj = load(path, k=k) if os.path.isfile(path) else load(path, k=k, layer=layer)
    if isinstance(obj, SAESet):
        raise ValueError(f"{path} holds layers {obj.layers}: pass --layer")
    trained = obj.layer
    if layer is not None and trained is not None and int(trained) != layer:
        print(f"saehook: warning: {path} was trained on layer {trained}'s residual, applied at layer {layer} "
              "(its features are not expected to mean the same there)", file=sys.stderr)
    if layer is not None:
        obj.metadata["layer"] = layer
    if obj.layer is None:
        raise ValueError(f"{path} does not say which layer it reads: pass --layer")
    return obj


def feature_arg(spec: str, sae, flag: str) -> int:
    """A feature named on the command line: an index, or `label:TEXT` resolved in the SAE's label
    store (an unknown or ambiguous label is an error listing the candidates)."""
    text = str(spec).strip()
    if text.lower().startswith("label:"):
        from ..labels import resolve_feature

        return resolve_feature(sae, text)
    try:
        f = int(text)
    except ValueError:
        raise ValueError(f"{flag} expects a feature index or label:TEXT, got {spec!r}") from None
    return check_feature(f, sae, flag)


def feature_labels(sae):
    """f -> the feature's label or None, for tables and pages (None for every feature when the SAE
    has no label file; a label file made for another SAE is an error, never shown)."""
    from ..labels import label_of

    store = sae.labels
    return (lambda f: None) if not len(store) else (lambda f: label_of(store, int(f)))


def capture_labels(manifest: dict, layer: int):
    """f -> label or None for a capture's features: the label store of the SAE the capture names
    (manifest["sae"]); no labels when the capture does not name one or its file is gone."""
    path = manifest.get("sae")
    if not path or not os.path.exists(path):
        return lambda f: None
    from ..labels import open_labels

    store = open_labels(path, layer=layer)
    return (lambda f: None) if not len(store) else (lambda f: store.label(int(f)))


def pairs(specs: List[str], flag: str, sae, value_type=float):
    """FEATURE=VALUE flags -> [(feature, value)]; FEATURE an index or label:TEXT (the value is after
    the last '=', so a label may contain one)."""
    out = []
    for spec in specs or []:
        f, sep, v = spec.rpartition("=")
        try:
            if not sep or not (f.strip().lstrip("-").isdigit() or f.strip().lower().startswith("label:")):
                raise ValueError
            value = value_type(v)
        except ValueError:
            raise ValueError(f"{flag} expects FEATURE=VALUE (a feature index or label:TEXT, and a number), "
                             f"got {spec!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{flag} {spec}: the value must be a finite number")
        out.append((feature_arg(f, sae, flag), value))
    return out


def _cap_bounds(spec: str, sae):
    """'F=MAX', 'F=MIN:MAX', 'F=MIN:' or 'F=:MAX' -> (F, max, min); F an index or label:TEXT."""
    f, sep, v = spec.rpartition("=")
    lo, colon, hi = v.partition(":")
    if not colon:
        lo, hi = "", lo
    try:
        if not sep or not (lo or hi):
            raise ValueError
        if not f:
            raise ValueError
        out = f, (float(hi) if hi else None), (float(lo) if lo else None)
    except ValueError:
        raise ValueError(f"--cap expects FEATURE=MAX or FEATURE=MIN:MAX (MIN or MAX may be empty), got {spec!r}") from None
    if any(v is not None and not math.isfinite(v) for v in out[1:]):
        raise ValueError(f"--cap {spec}: the bounds must be finite numbers")
    return (feature_arg(out[0], sae, "--cap"),) + out[1:]


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
    for f, v in pairs(args.add, "--add", sae):
        st.add(f, v)
    for f, v in pairs(args.clamp, "--clamp", sae):
        st.clamp(f, v)
    for f, v in pairs(args.scale, "--scale", sae):
        st.scale(f, v)
    for f in args.ablate or []:
        st.ablate(feature_arg(f, sae, "--ablate"))
    for spec in getattr(args, "cap", None) or []:
        f, hi, lo = _cap_bounds(spec, sae)
        st.cap(f, max=hi, min=lo)
    for f, v in pairs(getattr(args, "rescale", None), "--rescale", sae):
        st.rescale(f, v)
    if not st.ops:
        raise ValueError("no intervention given: use --add/--clamp/--scale/--ablate/--cap/--rescale or --spec")
    return st


def add_steer_flags(p):
    p.add_argument("--add", action="append", metavar="F=S", help="add S times feature F's decoder direction; F an index or label:TEXT (repeatable)")
    p.add_argument("--clamp", action="append", metavar="F=V", help="set feature F's activation to V (repeatable)")
    p.add_argument("--scale", action="append", metavar="F=C", help="multiply feature F's activation by C (repeatable)")
    p.add_argument("--ablate", action="append", metavar="F", help="remove feature F (repeatable)")
    p.add_argument("--cap", action="append", metavar="F=MAX|F=MIN:MAX",
                   help="keep the projection on F's unit direction within [MIN, MAX], either may be empty (repeatable)")
    p.add_argument("--rescale", action="append", metavar="F=C",
                   help="multiply the projection on F's unit direction by C (repeatable)")
    p.add_argument("--normalize", action="store_true", help="use unit-norm decoder directions")
    p.add_argument("--positions", default="all", metavar="all|prompt|generated|START:END",
                   help="which tokens are steered: all, prompt, generated, or absolute positions START <= pos < END")


def model_flags(p):
    p.add_argument("model", help="a GGUF file (llama.cpp) or a transformers model directory")
    p.add_argument("--engine", choices=["llama", "hf"], help="default: llama for a file, hf for a directory")
    p.add_argument("--sae", required=True, help="an SAE file or directory (any format saehook.load reads)")
    p.add_argument("--layer", type=nonnegative_int,
                   help="the layer the SAE reads (default: from the SAE's metadata; needed for a directory of layers)")
    p.add_argument("--k", type=positive_int, help="features kept per token (default: the SAE's own k)")
