"""The report as one self-contained HTML file, rendered from the report dict (build_report).

Everything is inline: the CSS, the plots (SVG written here, so no plotting library and no
JavaScript), and the thumbnails (base64 data URIs), so the file can be mailed, archived or opened
offline and always shows the same thing. Every piece of text from the report goes through
html.escape: ids and paths come from datasets we do not control.

Plots are horizontal bars on purpose: category and model names are long, and a bar per row keeps
them readable without rotated labels. Image and text queries share each chart, one colour per task.
"""

from __future__ import annotations

import base64
import io
import math
import os
from html import escape
from pathlib import Path

from .._io import atomic_write
from ..evaluate import TASKS
from .published import SETTINGS, published

TASK_COLOURS = {"i2i": "#2b6cb0", "t2i": "#dd6b20"}
OTHER_COLOUR, PUBLISHED_COLOUR, OURS_COLOUR = "#718096", "#a0aec0", "#d53f8c"
THUMB_PX = 128
FONT = 12  # px; SVG text sizes and label widths are derived from it


def to_html(report: dict, tiers: list[dict] | None = None, qualitative: list[dict] | None = None,
            variants: list[dict] | None = None, reranking: dict | None = None) -> str:
    """`tiers`: [{"name", "rows", "i2i", "t2i"}] for the mAP-versus-distractors curve.
    `qualitative`: [{"query_id", "query_image", "results": [{"id", "score", "positive", "image"}]}],
    images given as paths or encoded bytes. `variants`: [{"label", "report"}], reports of the
    same data with something added to the search ("adapt", "QE 2"): their own labelled rows in
    the summary and in the published charts. `reranking`: {"label", "tiers": [{"name", "rows",
    "global", "reranked"}]}, each tier's global and re-ranked mAP per task, side by side."""
    cfg, tasks = report["config"], report["tasks"]
    variants = variants or []
    sections = [_summary(report, variants)]
    if reranking:
        sections.append(_section("Re-ranking", _reranking(reranking), "reranking"))
    if tiers:
        sections.append(_section("mAP versus distractors", _curve(tiers, list(tasks))))
    for key, title in (("categories", "category"), ("subcategories", "subcategory"),
                       ("scale", "object scale"), ("clutter", "clutter")):
        chart = _task_bars(key, tasks)
        if chart:
            sections.append(_section(f"mAP per {title}", chart))
    sections.append(_published_section(report, variants))
    if qualitative:
        sections.append(_section("Top results for chosen queries", _qualitative(qualitative), "qualitative"))
    if report.get("warnings"):
        items = "".join(f"<li>{escape(w)}</li>" for w in report["warnings"])
        sections.append(_section("Warnings", f"<ul>{items}</ul>", "warnings"))
    title = f"ILIAS evaluation: {cfg.get('model') or cfg.get('results', '')}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><main>\n<h1>{escape(title)}</h1>\n"
        + "\n".join(sections)
        + "\n</main></body></html>\n"
    )


def write_html(report: dict, path: str | os.PathLike, tiers: list[dict] | None = None,
               qualitative: list[dict] | None = None, variants: list[dict] | None = None,
               reranking: dict | None = None) -> Path:
    """Written whole or not at all: a browser (or a rerun) never sees half a report."""
    return atomic_write(path, to_html(report, tiers, qualitative, variants, reranking))


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a202c;background:#fff;margin:0}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e2e8f0}
.meta{color:#4a5568;margin:0 0 12px}
table{border-collapse:collapse}th,td{padding:4px 10px;border-bottom:1px solid #e2e8f0;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td:first-child{white-space:nowrap}
.swatch{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}
svg{max-width:100%;height:auto;font-family:inherit}
.query{display:flex;gap:8px;align-items:flex-start;margin:10px 0;flex-wrap:wrap}
.item{width:132px;font-size:11px;color:#4a5568;overflow-wrap:anywhere}
.item img,.item .noimg{display:block;width:128px;height:128px;object-fit:contain;background:#f7fafc;
 border:3px solid #e2e8f0;border-radius:4px}
.item .noimg{display:flex;align-items:center;justify-content:center;text-align:center;font-size:10px}
.item.pos img,.item.pos .noimg{border-color:#38a169}.item.q img,.item.q .noimg{border-color:#2d3748}
.note{color:#4a5568}
"""


def _section(title: str, body: str, anchor: str | None = None) -> str:
    anchor = f' id="{escape(anchor)}"' if anchor else ""
    return f"<section{anchor}><h2>{escape(title)}</h2>\n{body}</section>"


def _label(report: dict, fallback: str = "this result") -> str:
    """The model (or the results file) with what was added to its search: "siglip + adapt"."""
    cfg = report["config"]
    base = cfg.get("model") or fallback
    return f"{base} + {cfg['variant']}" if cfg.get("variant") else base


def _summary(report: dict, variants: list[dict] = ()) -> str:
    cfg = report["config"]
    setting = SETTINGS[cfg["setting"]][1] if cfg.get("setting") else "no published setting"
    rows = cfg.get("database_rows")
    meta = [f"mAP@{cfg['k']} in percent", setting]
    if rows is not None:
        meta.append(f"{rows:,} database rows")
    meta.append(f"ilias-core {cfg.get('ilias_core', '?')}")
    if cfg.get("created"):
        meta.append(cfg["created"])
    body = [f'<p class="meta">{escape(" · ".join(meta))}</p>',
            ('<table id="map-table"><thead><tr><th>task</th><th>queries</th>'
             f"<th>mAP@{cfg['k']}</th><th>oracle</th><th>among published models</th></tr></thead><tbody>")]
    # the plain search first, then each variant as its own labelled row (never in place of it)
    for rep in [report, *(v["report"] for v in variants)]:
        suffix = f" + {rep['config']['variant']}" if rep["config"].get("variant") else ""
        for key, t in rep["tasks"].items():
            missing = f" ({t['missing']:,} missing)" if t.get("missing") else ""
            placed = t["placement"]["text"] if t.get("placement") else "-"
            body.append(f"<tr><td>{_swatch(key)}{escape(t['name'] + suffix)}</td>"
                        f"<td class=\"n\">{t['queries']:,}{escape(missing)}</td>"
                        f"<td class=\"n\"><b>{t['map']:.2f}</b></td><td class=\"n\">{t['oracle']:.2f}</td>"
                        f"<td>{escape(placed)}</td></tr>")
    body.append("</tbody></table>")
    body.append(f'<p class="note">source: {escape(str(cfg.get("results", "")))} · ground truth: '
                f'{escape(str(cfg.get("ground_truth", "")))}</p>')
    return _section("Summary", "\n".join(body), "summary")


def _reranking(rr: dict, tasks: tuple[str, ...] = ("i2i",)) -> str:
    """Per re-ranked tier: mAP of the global search, re-ranked, and the change (image queries:
    text queries are not re-ranked)."""
    head = "".join(f"<th>{escape(TASKS.get(t, t))}: global</th><th>re-ranked</th><th>change</th>" for t in tasks)
    rows = []
    for tier in rr["tiers"]:
        cells = []
        for t in tasks:
            g, r = tier["global"].get(t), tier["reranked"].get(t)
            if g is None or r is None:
                cells.append("<td>-</td><td>-</td><td>-</td>")
                continue
            cells.append(f'<td class="n">{g:.2f}</td><td class="n"><b>{r:.2f}</b></td><td class="n">{r - g:+.2f}</td>')
        rows.append(f'<tr><td>{escape(tier["name"])}</td><td class="n">{tier["rows"]:,}</td>{"".join(cells)}</tr>')
    return (f'<p class="meta">{escape(rr["label"])}; text queries are not re-ranked (they have no image)</p>'
            f"<table><thead><tr><th>database</th><th>rows</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _swatch(task: str) -> str:
    return f'<span class="swatch" style="background:{_colour(task)}"></span>'


def _colour(task: str) -> str:
    return TASK_COLOURS.get(task, OTHER_COLOUR)


# --- charts -------------------------------------------------------------------------------------


def _task_bars(key: str, tasks: dict) -> str:
    """One row per group (category, scale bin...), one bar per task, so image and text retrieval
    can be compared group by group."""
    labels: list[str] = []
    for t in tasks.values():
        labels += [g for g in (t.get(key) or {}) if g not in labels]
    if not labels:
        return ""
    rows = [(_group_label(g), [((t.get(key) or {}).get(g), _colour(name)) for name, t in tasks.items()], False)
            for g in labels]
    legend = [(t["name"], _colour(name)) for name, t in tasks.items()]
    return _hbars(key, f"mAP per {key}", rows, legend)


def _group_label(key: str) -> str:
    """Scale and clutter bins arrive as "lo-hi" with full float precision; people want 3 digits."""
    lo, sep, hi = key.partition("-")
    try:
        a, b = float(lo), float(hi)
    except ValueError:
        return key
    if not sep:
        return key
    return f"≥ {a:.3g}" if math.isinf(b) else f"{a:.3g} – {b:.3g}"


def _published_section(report: dict, variants: list[dict] = ()) -> str:
    setting = report["config"].get("setting")
    if not setting:
        rows = report["config"].get("database_rows")
        size = f" ({rows:,} rows)" if rows is not None else ""
        return _section("Among the published models",
                        f'<p class="note">Not compared: the database{escape(size)} is neither mini-ILIAS (5M) '
                        "nor ILIAS (100M), and published numbers are only comparable at those sizes.</p>",
                        "published")
    ours = [(_label(r), r["tasks"]) for r in [report, *(v["report"] for v in variants)]
            if r["config"].get("setting") == setting]
    charts = []
    for name, t in report["tasks"].items():
        table = published(name, setting)
        if not table:
            continue
        rows = [(model, [(v, PUBLISHED_COLOUR)], False, v) for model, v in table]
        for label, tasks in ours:
            if name in tasks:
                rows.append((f"▶ {label}", [(tasks[name]["map"], OURS_COLOUR)], True, tasks[name]["map"]))
        # ranked as place() ranks: published numbers have one decimal, so ours is compared rounded
        rows.sort(key=lambda r: -(round(r[3], 1) + 1e-9 if r[2] else r[3]))  # ours above the published ties
        charts.append(f"<h3>{escape(t['name'])}, {escape(SETTINGS[setting][1])}</h3>"
                      + _hbars(f"published-{name}", f"{t['name']} among published models", [r[:3] for r in rows]))
    column = SETTINGS[setting][0]
    note = (f'<p class="note">Published numbers: column {escape(column)} of the ILIAS table (frozen features)'
            + ("; the adapted or expanded rows are compared with those same frozen-model numbers, not with the "
               "page's third, unlabelled column" if variants else "") + ".</p>")
    body = "\n".join(charts) or '<p class="note">No published numbers for these tasks.</p>'
    return _section("Among the published models", body + "\n" + note, "published")


def _hbars(svg_id: str, title: str, rows: list[tuple[str, list, bool]], legend=None) -> str:
    """rows: (label, [(value or None, colour)], emphasised). Values are mAP in percent."""
    per_row = len(rows[0][1])
    bar_h, gap = (14, 6) if per_row == 1 else (10, 8)
    row_h = per_row * bar_h + gap
    label_w = min(360, 16 + int(0.6 * FONT * max(len(r[0]) for r in rows)))
    plot_w, top = 600, 28 if legend else 8
    width, height = label_w + plot_w + 60, top + len(rows) * row_h + 22
    top_value = _nice_max(max((v for r in rows for v, _ in r[1] if v is not None), default=1.0))
    x = lambda v: label_w + plot_w * v / top_value
    out = [_axis_x(x, top_value, top, height - 20)]
    for i, (label, bars, strong) in enumerate(rows):
        y0 = top + i * row_h + gap / 2
        weight = ' font-weight="bold"' if strong else ""
        out.append(f'<text x="{label_w - 8}" y="{y0 + per_row * bar_h / 2 + FONT / 3:.1f}" text-anchor="end"'
                   f' font-size="{FONT}"{weight}>{escape(label)}</text>')
        for j, (v, colour) in enumerate(bars):
            if v is None:
                continue
            y = y0 + j * bar_h
            out.append(f'<rect x="{label_w}" y="{y:.1f}" width="{x(v) - label_w:.1f}" height="{bar_h - 1}"'
                       f' fill="{colour}"><title>{escape(label)}: {v:.2f}</title></rect>')
            out.append(f'<text x="{x(v) + 4:.1f}" y="{y + bar_h - 2:.1f}" font-size="{FONT - 2}"{weight}>{v:.1f}</text>')
    if legend:
        out.append(_legend(legend, label_w, 14))
    return _svg(svg_id, title, width, height, out)


def _curve(tiers: list[dict], tasks: list[str]) -> str:
    """mAP against database rows, log x: tiers grow by orders of magnitude (1M, 5M, 100M)."""
    tiers = sorted(tiers, key=lambda t: t["rows"])
    lo, hi = math.log10(tiers[0]["rows"]), math.log10(tiers[-1]["rows"])
    lo, hi = math.floor(lo), math.ceil(hi)
    if lo == hi:  # one tier, or all at one power of ten: still give the axis a decade
        lo, hi = lo - 1, hi + 1
    left, plot_w, top, plot_h = 60, 760, 52, 300
    width, height = left + plot_w + 40, top + plot_h + 50
    values = [t[k] for t in tiers for k in tasks if t.get(k) is not None]
    top_value = _nice_max(max(values, default=1.0))
    x = lambda rows: left + plot_w * (math.log10(rows) - lo) / (hi - lo)
    y = lambda v: top + plot_h * (1 - v / top_value)
    out = []
    for tick in _ticks(top_value):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#e2e8f0"/>'
                   f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="{FONT - 1}">{tick:g}</text>')
    for p in range(lo, hi + 1):
        out.append(f'<line x1="{x(10**p):.1f}" x2="{x(10**p):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#e2e8f0"/>'
                   f'<text x="{x(10**p):.1f}" y="{top + plot_h + 16}" text-anchor="middle" font-size="{FONT - 1}">'
                   f"{_rows_label(10**p)}</text>")
    last, lift = -math.inf, 0
    for t in tiers:  # name each tier above the plot, where lines cannot cover it; close names take turns
        at = x(t["rows"])
        lift = 12 - lift if at - last < 60 else 0
        last = at
        out.append(f'<line x1="{at:.1f}" x2="{at:.1f}" y1="{top}" y2="{top + plot_h}"'
                   f' stroke="#cbd5e0" stroke-dasharray="3 3"/>'
                   f'<text x="{at:.1f}" y="{top - 6 - lift}" text-anchor="middle" font-size="{FONT - 1}">'
                   f'{escape(str(t["name"]))}</text>')
    for task in tasks:
        points = [(x(t["rows"]), y(t[task]), t) for t in tiers if t.get(task) is not None]
        if not points:
            continue
        colour = _colour(task)
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for px, py, t in points:
            out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{colour}"><title>{escape(str(t["name"]))}, '
                       f'{t["rows"]:,} rows: {task} {t[task]:.2f}</title></circle>'
                       f'<text x="{px + 6:.1f}" y="{py - 6:.1f}" font-size="{FONT - 2}" fill="{colour}">{t[task]:.1f}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle" font-size="{FONT}">'
               "database rows (log scale)</text>")
    out.append(f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" font-size="{FONT}"'
               f' transform="rotate(-90 14 {top + plot_h / 2})">mAP</text>')
    out.append(_legend([(t, _colour(t)) for t in tasks], left + plot_w - 160, 14))
    return _svg("curve", "mAP versus database rows", width, height, out)


def _axis_x(x, top_value: float, y0: float, y1: float) -> str:
    return "".join(
        f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{y0}" y2="{y1}" stroke="#e2e8f0"/>'
        f'<text x="{x(t):.1f}" y="{y1 + 14}" text-anchor="middle" font-size="{FONT - 1}">{t:g}</text>'
        for t in _ticks(top_value))


def _legend(items: list[tuple[str, str]], x0: float, y: float) -> str:
    out, x = [], x0
    for name, colour in items:
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14}" y="{y}" font-size="{FONT}">{escape(name)}</text>')
        x += 24 + 0.6 * FONT * len(name)
    return "".join(out)


def _svg(svg_id: str, title: str, width: float, height: float, body: list[str]) -> str:
    return (f'<svg id="{escape(svg_id)}" xmlns="http://www.w3.org/2000/svg" role="img" width="{width:.0f}"'
            f' height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}"><title>{escape(title)}</title>'
            + "".join(body) + "</svg>")


def _nice_max(v: float) -> float:
    """The axis end: the smallest 1, 2, 2.5 or 5 times a power of ten at or above v."""
    if v <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(v))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= v - 1e-9)


def _ticks(top_value: float) -> list[float]:
    """Five steps, or four when the axis ends at 2 x 10^k, so that every tick is a round number."""
    mantissa = top_value / 10 ** math.floor(math.log10(top_value))
    n = 4 if round(mantissa, 6) == 2 else 5
    return [top_value * i / n for i in range(n + 1)]


def _rows_label(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n:g}"


# --- qualitative --------------------------------------------------------------------------------


def _qualitative(queries: list[dict]) -> str:
    out = ['<p class="note">Each row: the query (dark border), then its top results; positives have a green border.</p>']
    for q in queries:
        items = [_item(q.get("query_image"), str(q["query_id"]), "query", "q")]
        for rank, r in enumerate(q.get("results", []), 1):
            caption = f"{rank}. {r['score']:.3f} · {r['id']}"
            items.append(_item(r.get("image"), str(r["id"]), caption, "pos" if r.get("positive") else ""))
        out.append(f'<div class="query"><div class="item"><b>{escape(str(q["query_id"]))}</b></div>'
                   + "".join(items) + "</div>")
    return "\n".join(out)


def _item(image, alt: str, caption: str, kind: str) -> str:
    uri = _thumbnail(image)
    picture = (f'<img src="{uri}" alt="{escape(alt)}" width="128" height="128">' if uri
               else f'<div class="noimg">{escape(alt)}</div>')
    return f'<div class="item {kind}">{picture}{escape(caption)}</div>'


def _thumbnail(image) -> str | None:
    """A ~128 px JPEG as a data URI, so the report stays one small file; None (the id is shown
    instead) when the file is missing or unreadable: a report is still useful. Without Pillow,
    small PNG and JPEG files (the demo's images) go in as they are, the browser scales them.
    `image`: a path, or the encoded bytes (a member of a tar)."""
    if isinstance(image, bytes):
        source = io.BytesIO(image)
    elif image and Path(image).is_file():
        source = image
    else:
        return None
    try:
        from PIL import Image
    except ImportError:
        return _as_is(image)
    try:
        with Image.open(source) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_AS_IS_BYTES = 64 << 10
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


def _as_is(image) -> str | None:
    """The file itself as a data URI if it is a PNG or JPEG of at most 64 KiB, else None."""
    try:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
    except OSError:
        return None
    mime = next((m for sig, m in _SIGNATURES.items() if data.startswith(sig)), None)
    if mime is None or len(data) > _AS_IS_BYTES:
        return None
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
