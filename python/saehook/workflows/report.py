"""Self-contained HTML pages (no scripts, no network) for the command line's reports."""
from __future__ import annotations

import html
from typing import List, Sequence


def features_html(texts: Sequence[str], rows: List[dict], feature: int, title: str = "") -> str:
    """The text with each token shaded by `feature`'s activation; hovering a token shows its
    top features. rows: {"position", "features": [[index, value], ...]} per captured token."""
    act = {row["position"]: dict(map(tuple, row["features"])).get(feature, 0.0) for row in rows}
    top = {row["position"]: row["features"] for row in rows}
    peak = max([v for v in act.values() if v > 0], default=1.0)
    spans = []
    for p, text in enumerate(texts):
        a = max(0.0, act.get(p, 0.0)) / peak
        tip = "; ".join(f"#{i}: {v:.3f}" for i, v in top.get(p, [])) or "not captured"
        shown = html.escape(text).replace("\n", "&#8629;<br>") or "&nbsp;"
        spans.append(f'<span class="t" style="background: rgba(255, 120, 0, {a:.3f})" '
                     f'title="{html.escape(tip)}">{shown}</span>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>saehook features</title>
<style>
body {{ font-family: sans-serif; margin: 2em; background: #fff; color: #111; }}
.text {{ font-family: monospace; font-size: 18px; line-height: 2; white-space: pre-wrap; }}
.t {{ border-radius: 3px; padding: 1px 0; }}
</style></head><body>
<h1>Feature {feature}</h1>
<p>{html.escape(title)}: tokens shaded by feature {feature}'s activation (peak {peak:.3f});
hover a token for its top features.</p>
<div class="text">{"".join(spans)}</div>
</body></html>
"""


def histogram_svg(values: Sequence[float], label: str, bins: int = 30, width: int = 600, height: int = 160) -> str:
    """An inline SVG histogram (no scripts, no external files)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return ""
    counts, edges = np.histogram(v, bins=bins)
    peak = max(1, counts.max())
    bw = width / bins
    rects = "".join(f'<rect x="{i * bw:.1f}" y="{height - 20 - (c / peak) * (height - 30):.1f}" width="{bw - 1:.1f}" '
                    f'height="{(c / peak) * (height - 30):.1f}" fill="#e8700a"><title>{c}</title></rect>'
                    for i, c in enumerate(counts))
    return (f'<figure><svg width="{width}" height="{height}" role="img">{rects}'
            f'<text x="0" y="{height - 4}" font-size="11">{edges[0]:.3g}</text>'
            f'<text x="{width - 40}" y="{height - 4}" font-size="11">{edges[-1]:.3g}</text></svg>'
            f"<figcaption>{html.escape(label)}</figcaption></figure>")


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
                cells.append(f'<td><div class="bar" style="width:{w:.1f}px"></div> {v:.4g}</td>')
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
