"""Self-contained HTML pages (no scripts, no network) for the command line's reports."""
from __future__ import annotations

import html
from typing import List, Optional, Sequence


def features_html(texts: Sequence[str], rows: List[dict], feature: int, title: str = "",
                  d_sae: Optional[int] = None, label: Optional[str] = None) -> str:
    """The text with each token shaded by `feature`'s activation; hovering a token shows its
    top features. rows: {"position", "features": [[index, value], ...]} per captured token.
    d_sae: the SAE's width, to refuse a feature it does not have; label: the feature's label."""
    if d_sae is not None and not 0 <= int(feature) < d_sae:
        raise IndexError(f"feature {feature} is out of range: the SAE has features 0 to {d_sae - 1}")
    act = {row["position"]: dict(map(tuple, row["features"])).get(feature, 0.0) for row in rows}
    top = {row["position"]: row["features"] for row in rows}
    peak = max([v for v in act.values() if v > 0], default=0.0)
    spans = []
    for p, text in enumerate(texts):
        a = max(0.0, act.get(p, 0.0)) / peak if peak > 0 else 0.0
        tip = "; ".join(f"#{i}: {v:.3f}" for i, v in top.get(p, [])) or "not captured"
        if p in act:
            tip = f"feature {feature}: {act[p]:.3f} | top: {tip}"
        shown = html.escape(text).replace("\n", "&#8629;<br>") or "&nbsp;"
        spans.append(f'<span class="t" style="background: rgba(255, 120, 0, {a:.3f})" '
                     f'title="{html.escape(tip)}">{shown}</span>')
    fired = sum(1 for v in act.values() if v > 0)
    named = f" ({html.escape(label)})" if label else ""
    steps = "".join(f'<span class="swatch" style="background: rgba(255, 120, 0, {f:.2f})">{f * peak:.2f}</span> '
                    for f in (0.0, 0.25, 0.5, 0.75, 1.0)) if peak > 0 else ""
    legend = (f"<p class=\"legend\">Shading: feature {feature}'s activation at each token, from none (white) to its "
              f"peak on this text, {peak:.3f} (full orange): {steps}</p>" if peak > 0 else
              f"<p class=\"legend\">Feature {feature} is not active on any token of this text (nothing is shaded).</p>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>saehook features</title>
<style>
body {{ font-family: sans-serif; margin: 2em; background: #fff; color: #111; }}
.text {{ font-family: monospace; font-size: 18px; line-height: 2; white-space: pre-wrap; }}
.t {{ border-radius: 3px; padding: 1px 0; }}
.swatch {{ border-radius: 3px; padding: 1px 6px; font-family: monospace; }}
</style></head><body>
<h1>Feature {feature}{named}</h1>
<p>{html.escape(title)}: active on {fired} of {len(act)} captured tokens. Hover a token for feature {feature}'s
activation there and the token's top features (#index: activation); tokens not captured say so.</p>
{legend}
<div class="text">{"".join(spans)}</div>
</body></html>
"""


def _nice(v: float) -> str:
    return f"{v:.3g}"


def histogram_svg(values: Sequence[float], label: str, bins: int = 30, width: int = 600, height: int = 200,
                  x_label: str = "value", y_label: str = "count") -> str:
    """An inline SVG histogram with axes: x ticks at the bin edges' ends and middle, y ticks at 0,
    half and the tallest bin's count, each bar's count on hover (no scripts, no external files)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return ""
    counts, edges = np.histogram(v, bins=bins)
    peak = max(1, int(counts.max()))
    left, bottom, top_pad = 48, 36, 10
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    bw = plot_w / bins
    y0 = top_pad + plot_h
    rects = "".join(f'<rect x="{left + i * bw:.1f}" y="{y0 - (c / peak) * plot_h:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                    f'height="{(c / peak) * plot_h:.1f}" fill="#e8700a"><title>{int(c)} in [{_nice(edges[i])}, '
                    f'{_nice(edges[i + 1])})</title></rect>' for i, c in enumerate(counts))
    axes = (f'<line x1="{left}" y1="{y0}" x2="{left + plot_w}" y2="{y0}" stroke="#333"/>'
            f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{y0}" stroke="#333"/>')
    ticks = ""
    for frac in (0.0, 0.5, 1.0):
        x = left + frac * plot_w
        val = edges[0] + frac * (edges[-1] - edges[0])
        anchor = "start" if frac == 0 else ("end" if frac == 1 else "middle")
        ticks += (f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 4}" stroke="#333"/>'
                  f'<text x="{x:.1f}" y="{y0 + 16}" font-size="11" text-anchor="{anchor}">{_nice(val)}</text>')
    for c in sorted({0, peak // 2, peak}):
        y = y0 - (c / peak) * plot_h
        ticks += (f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#333"/>'
                  f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{c}</text>')
    names = (f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" font-size="12" text-anchor="middle">{html.escape(x_label)}</text>'
             f'<text x="12" y="{top_pad + plot_h / 2:.1f}" font-size="12" text-anchor="middle" '
             f'transform="rotate(-90 12 {top_pad + plot_h / 2:.1f})">{html.escape(y_label)}</text>')
    return (f'<figure><svg width="{width}" height="{height}" role="img">{axes}{rects}{ticks}{names}</svg>'
            f"<figcaption>{html.escape(label)} ({v.size} values, {bins} bins, tallest bin {peak})</figcaption></figure>")


def paired_bars_html(title: str, intro: str, rows: Sequence[dict]) -> str:
    """The compare report: per feature, A's and B's firing frequencies as two bars on one shared
    scale (the largest frequency of either dataset in the table is the full width)."""
    scale = max([max(r["freq_a"], r["freq_b"]) for r in rows] or [0.0]) or 1.0
    full = 200.0
    body = []
    for r in rows:
        bars = "".join(f'<div class="pair"><span class="tag">{tag}</span><div class="bar {tag}" '
                       f'style="width:{full * r[key] / scale:.1f}px"></div> {r[key]:.4f}</div>'
                       for tag, key in (("A", "freq_a"), ("B", "freq_b")))
        label = f" {html.escape(r['label'])}" if r.get("label") else ""  # the feature's label, when it has one
        body.append(f"<tr><td>#{int(r['feature'])}{label}</td><td>{bars}</td><td>{r['log_ratio']:+.2f}</td></tr>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #111; background: #fff; }}
table {{ border-collapse: collapse; }} td, th {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }}
.bar {{ display: inline-block; height: 10px; vertical-align: middle; }} .bar.A {{ background: #e8700a; }}
.bar.B {{ background: #1f77b4; }} .tag {{ display: inline-block; width: 1.2em; font-size: 11px; }}
</style></head><body>
<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>
<p>Bars: firing frequency (fraction of tokens) in A (orange) and B (blue), on one scale: {full:.0f} px = {scale:.4f}.</p>
<table><tr><th>feature</th><th>frequency in A and B</th><th>log(A/B)</th></tr>{"".join(body)}</table>
</body></html>
"""


def table_html(title: str, intro: str, columns: List[str], rows: List[list], bars: Sequence[str] = (),
               figures: Sequence[str] = ()) -> str:
    """A report page: optional figures (inline SVG), then a table whose `bars` columns (numbers)
    also get a proportional bar."""
    peaks = {c: max([abs(r[columns.index(c)]) for r in rows] or [1.0]) or 1.0 for c in bars}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c, v in zip(columns, r):
            if c in peaks:
                w = 100.0 * abs(v) / peaks[c]
                cells.append(f'<td><div class="bar" style="width:{w:.1f}px"></div> {v:.4f}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #111; background: #fff; }}
table {{ border-collapse: collapse; }} td, th {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }}
.bar {{ display: inline-block; height: 10px; background: #e8700a; vertical-align: middle; }}
</style></head><body>
<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>
{"".join(figures)}
<table><tr>{head}</tr>{"".join(body)}</table>
</body></html>
"""
