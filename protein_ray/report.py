"""One self-contained HTML report of a scored screen: plates, controls, QC and hits.

The report is a single file a scientist can mail or open from a bucket without a
server or network: inline CSS, inline SVG heatmaps and charts, thumbnails as PNG
data URIs, no JavaScript. Colours are computed here (viridis through matplotlib's
colormap lookup) so the browser only draws rectangles. Every string that reaches
the page goes through ``html.escape``: plate names, image ids and plate-map
columns come from users' files.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from protein_ray import storage
from protein_ray.plates import (
    NO_DATA_RGB,
    class_keys,
    parse_well,
    plate_format,
    positive_matrix,
    viridis_index,
    viridis_rgb,
)

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

def _hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


NO_DATA = _hex(NO_DATA_RGB)
MAX_LISTED = 500  # failed/flagged rows listed; a whole bad plate would make the page unusable
THUMB_PX = 96
FIELDS_PER_WELL = 3
LOAD_CHUNK = 16  # fields per load_fields call
THUMBNAIL_LOADS = 2  # load_fields calls at once
CONTROL_MARK = {"negative": "N", "positive": "P"}
# Stain display colours (RGB weights) in stain order: HPA's red, green, blue, yellow, then extras.
STAIN_COLOURS = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1))
WELL_COLUMNS = {"plate", "well", "role", "images_scored", "images_failed", "images_flagged"}
WELL_PREFIXES = ("mean_prob_", "median_prob_", "frac_pos_", "robust_z_")

CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222}h1{font-size:20px}h3{font-size:14px}
h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}.note{color:#666}svg text{font-family:sans-serif}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f3f3f3}td.t,th.t{text-align:left}.totals span{display:inline-block;margin-right:18px;font-size:15px}
.grid{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0}figcaption{font-size:12px;font-weight:600}
.good{background:#c8ecc8}.marginal{background:#fbe3a6}.bad{background:#f6c0c0}
.thumbs{text-align:left}.thumbs figure{display:inline-block;font-size:11px;margin-right:4px;vertical-align:top}
.thumbs .none{width:96px;height:96px;background:#eee;overflow-wrap:anywhere}
"""


# ------------------------------------------------------------- formatting ----


def _missing(value) -> bool:
    try:
        return value is None or bool(value != value)  # NaN is the only value not equal to itself
    except TypeError:  # pd.NA refuses bool()
        return True


def _e(value) -> str:
    """Escaped text for the page; missing values are blank."""
    return "" if _missing(value) else html.escape(str(value))


def _num(value, digits: int = 2) -> str:
    return "–" if _missing(value) else f"{float(value):.{digits}f}"


def _column(frame: pd.DataFrame, name: str, default=None) -> list:
    """A column as a list, or ``default`` for every row when the column is absent (optional inputs)."""
    return frame[name].tolist() if name in frame.columns else [default] * len(frame)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """``rows`` hold already-escaped HTML; the first ``text_columns`` are left-aligned."""
    def cells(tag, values):
        return "".join(f'<{tag}{" class=t" if i < text_columns else ""}>{v}</{tag}>' for i, v in enumerate(values))
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table><tr>{cells('th', [_e(h) for h in header])}</tr>{body}</table>"


@functools.cache
def _viridis_table() -> tuple[str, ...]:
    """The viridis colours as hex, made once: heatmaps colour thousands of wells."""
    return tuple(_hex(row) for row in viridis_rgb())


def _viridis(values) -> list[str]:
    """Hex colours of ``values`` on 0..1 (clipped, binned as matplotlib does); ``NO_DATA`` grey for NaN."""
    values = np.asarray(values, dtype=float).ravel()
    index = viridis_index(values)
    return [NO_DATA if np.isnan(v) else _viridis_table()[i] for v, i in zip(values, index)]


def _ink(fill: str) -> str:
    """Black or white text, whichever reads on ``fill``."""
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


# --------------------------------------------------------------- heatmaps ----


def heatmap_svg(plate_wells: pd.DataFrame, key: str, shape: tuple[int, int]) -> str:
    """One class on one plate as the physical plate: one rect per well position, row A at the
    top, column 1 on the left, coloured by ``mean_prob_<key>``; N/P mark the controls."""
    cell = 14 if shape[0] <= 8 else 8  # px per well: a 384-well plate stays about as wide as a 96-well one
    left, top, font = 16, 12, min(8.0, cell * 0.75)
    # Columns as lists, colours in one lookup: a screen's report draws a rect per well and class.
    means = [np.nan if _missing(m) else float(m) for m in _column(plate_wells, f"mean_prob_{key}")]
    wells = [(fill, mean, z, "" if _missing(role) else str(role)) for fill, mean, z, role in
             zip(_viridis(means), means, _column(plate_wells, f"robust_z_{key}"), _column(plate_wells, "role"))]
    at = {parse_well(w): well for w, well in zip(plate_wells["well"], wells)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + shape[1] * cell + 2}" '
             f'height="{top + shape[0] * cell + 2}" font-size="{font}">']
    parts += [f'<text x="{left + c * cell + cell / 2}" y="{top - 3}" text-anchor="middle">{c + 1}</text>'
              for c in range(shape[1])]
    parts += [f'<text x="{left - 3}" y="{top + r * cell + cell / 2 + font / 3:.1f}" text-anchor="end">'
              f'{chr(ord("A") + r)}</text>' for r in range(shape[0])]
    parts += [_well_rect(at.get((r, c)), f"{chr(ord('A') + r)}{c + 1:02d}", left + c * cell, top + r * cell, cell,
                         font) for r, c in np.ndindex(*shape)]
    return "".join(parts) + "</svg>"


def _well_rect(well: tuple | None, name: str, x: int, y: int, cell: int, font: float) -> str:
    """A well's rect with its tooltip; ``well`` is (fill, mean, robust z, role), None for
    a position nobody mentions (grey, "no data")."""
    fill, mean, z, role = well or (NO_DATA, None, None, "")
    title = f"{name}: no data" if well is None else \
        f"{name} · {_e(role) or 'no role'} · mean {_num(mean)} · robust z {_num(z)}"
    mark = CONTROL_MARK.get(role)
    outline = f' stroke="#d62728" stroke-width="{1.5 if cell > 10 else 1}"' if mark else ""
    text = (f'<text class="ctl" x="{x + (cell - 1) / 2}" y="{y + cell / 2 + font / 3:.1f}" text-anchor="middle" '
            f'fill="{_ink(fill)}" pointer-events="none">{mark}</text>') if mark else ""
    return (f'<rect class="well" data-well="{name}" x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
            f'fill="{fill}"{outline}><title>{title}</title></rect>{text}')


def colour_bar_svg(width: int = 240) -> str:
    """The 0..1 viridis scale shared by every heatmap, with ticks; grey = no data."""
    steps = 60
    fills = _viridis((np.arange(steps) + 0.5) / steps)
    step = width / steps
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 90}" height="34" font-size="10">']
    parts += [f'<rect x="{8 + i * step:.2f}" y="2" width="{step + 0.3:.2f}" height="12" fill="{f}"/>'
              for i, f in enumerate(fills)]
    for tick in (0, 0.25, 0.5, 0.75, 1):
        x = 8 + tick * width
        parts.append(f'<line x1="{x}" x2="{x}" y1="14" y2="18" stroke="#333"/>'
                     f'<text x="{x}" y="29" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<rect x="{width + 24}" y="2" width="12" height="12" fill="{NO_DATA}"/>'
                 f'<text x="{width + 40}" y="12">no data</text></svg>')
    return "".join(parts)


# ------------------------------------------------------------ plate parts ----


def edge_svg(plate_wells: pd.DataFrame, key: str, shape: tuple[int, int]) -> str:
    """Mean of ``mean_prob_<key>`` over edge and inner wells, per role: bars on 0..1."""
    edge = np.array([p is not None and (p[0] in (0, shape[0] - 1) or p[1] in (0, shape[1] - 1))
                     for p in map(parse_well, plate_wells["well"])], dtype=bool)
    means = np.asarray(_column(plate_wells, f"mean_prob_{key}", np.nan), dtype=float)
    roles = np.array(["all" if _missing(r) else str(r) for r in _column(plate_wells, "role")], dtype=object)
    groups = [r for r in ("negative", "positive", "sample", "all") if (roles == r).any()]
    groups += sorted(set(roles) - set(groups) - {"empty"})
    height, bar = 70, 12
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{20 + len(groups) * 34}" height="{height + 28}" '
             f'font-size="9"><line x1="4" x2="{16 + len(groups) * 34}" y1="{height}" y2="{height}" stroke="#999"/>']
    for g, role in enumerate(groups):
        for offset, (where, colour) in enumerate(((edge, "#444"), (~edge, "#aaa"))):
            chosen = means[(roles == role) & where & ~np.isnan(means)]
            value = float(chosen.mean()) if chosen.size else np.nan
            x, h = 8 + g * 34 + offset * (bar + 1), 0 if np.isnan(value) else value * (height - 4)
            parts.append(f'<rect x="{x}" y="{height - h:.1f}" width="{bar}" height="{h:.1f}" fill="{colour}">'
                         f'<title>{_e(role)} {"edge" if offset == 0 else "inner"}: mean {_num(value)} '
                         f'({chosen.size} wells)</title></rect>')
        parts.append(f'<text x="{8 + g * 34 + bar}" y="{height + 12}" text-anchor="middle">{_e(role[:8])}</text>')
    return "".join(parts) + "</svg>"


def _z_class(value) -> str:
    return "" if _missing(value) else "good" if value >= 0.5 else "marginal" if value >= 0 else "bad"


def plate_stats_table(stats: pd.DataFrame) -> str:
    """Z', robust Z', controls and edge effect per class of one plate, Z' cells coloured."""
    if stats.empty:
        return "<p class=note>No control statistics for this plate.</p>"
    rows = []
    for row in stats.to_dict("records"):
        z_cells = [f'<span class="{_z_class(row.get(c))}">{_num(row.get(c))}</span>'
                   for c in ("z_prime", "robust_z_prime")]
        rows.append([_e(row.get("class")), *z_cells, _num(row.get("n_negative"), 0), _num(row.get("n_positive"), 0),
                     _num(row.get("edge_mean")), _num(row.get("inner_mean")), _num(row.get("edge_effect"))])
    return _table(["class", "Z′", "robust Z′", "negative wells", "positive wells", "edge mean", "inner mean",
                   "edge effect"], rows)


def _flag_lists(predictions: pd.DataFrame) -> list[list[str]]:
    return [[f for f in str(text).split(";") if f] if not _missing(text) else [] for text in
            _column(predictions, "qc_flags", "")]


def qc_table(predictions: pd.DataFrame) -> str:
    """One plate's fields: scored, failed per reason, QC-flagged per flag."""
    errors = [str(e) for e in _column(predictions, "error") if not _missing(e)]
    flags = [f for fs in _flag_lists(predictions) for f in fs]
    reasons, flag_names = sorted(set(errors)), sorted(set(flags))
    header = ["fields", "scored"] + [f"failed: {r}" for r in reasons] + [f"flagged: {f}" for f in flag_names]
    row = [str(len(predictions)), str(len(predictions) - len(errors))]
    row += [str(errors.count(r)) for r in reasons] + [str(flags.count(f)) for f in flag_names]
    return _table(header, [row], text_columns=0)


def plate_section(plate, plate_wells, plate_predictions, plate_stats, classes, keys) -> str:
    shape = plate_format(plate_wells["well"])
    maps = "".join(f'<figure class="heatmap"><figcaption>{_e(name)}</figcaption>{heatmap_svg(plate_wells, key, shape)}'
                   f"</figure>" for name, key in zip(classes, keys))
    edges = "".join(f"<figure><figcaption>{_e(name)}</figcaption>{edge_svg(plate_wells, key, shape)}</figure>"
                    for name, key in zip(classes, keys))
    return (f'<section class="plate"><h2>Plate {_e(plate)} ({shape[0] * shape[1]} wells)</h2>'
            f"<h3>Mean probability per well</h3><p class=note>N / P (red outline): negative / positive controls; "
            f"hover a well for its role and robust z.</p>{colour_bar_svg()}<div class=grid>{maps}</div>"
            f"<h3>Controls and edge effect per class</h3>{plate_stats_table(plate_stats)}"
            f"<h3>Image QC</h3>{qc_table(plate_predictions)}"
            f"<h3>Edge vs inner wells</h3><p class=note>Mean probability over wells; dark: edge wells "
            f"(outer rows and columns), light: inner wells.</p><div class=grid>{edges}</div></section>")


# ------------------------------------------------------------- thumbnails ----


def thumbnail_png(image: np.ndarray, size: int = THUMB_PX) -> bytes:
    """Stains composited to RGB in their display colours (1 stain: grey), clipped, shrunk to ``size``."""
    from PIL import Image

    image = np.asarray(image, dtype=np.float32)
    image = image[..., None] if image.ndim == 2 else image
    # Block means first (fields can be 2,560 px a side); averaging keeps small bright spots visible.
    # Pillow's box reduce of each stain costs a tenth of numpy's strided mean.
    step = max(1, min(image.shape[:2]) // (2 * size))
    image = np.nan_to_num(np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., stain])).reduce(step))
                                    for stain in range(image.shape[-1])], axis=-1))
    weights = np.ones((1, 3)) if image.shape[-1] == 1 else np.array(STAIN_COLOURS[:image.shape[-1]], dtype=float)
    rgb = np.clip(image[..., :len(weights)] @ weights, 0.0, 1.0)
    picture = Image.fromarray((rgb * 255 + 0.5).astype(np.uint8))
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _load_thumbnails(load_fields, image_ids: list[str], chunk: int = LOAD_CHUNK) -> dict[str, str]:
    """Image id -> data URI. Fields are loaded a few at a time (150 full 4-stain fields would
    take gigabytes), two loads at once (decoders and Pillow release the GIL: 1.4 -> 0.8 s for
    a report's 97 fields on 2 cores); a failed load costs those thumbnails, not the report."""
    if load_fields is None:
        return {}

    def thumbnails_of(ids: list[str]) -> dict[str, str]:
        try:
            images = load_fields(ids)
        except Exception:
            logger.warning("thumbnails left out: loading fields %s failed", ids, exc_info=True)
            return {}
        return {i: "data:image/png;base64," + base64.b64encode(thumbnail_png(images[i])).decode("ascii")
                for i in ids if i in images}

    chunks = [image_ids[start:start + chunk] for start in range(0, len(image_ids), chunk)]
    with ThreadPoolExecutor(THUMBNAIL_LOADS) as pool:
        return {key: uri for thumbs in pool.map(thumbnails_of, chunks) for key, uri in thumbs.items()}


# -------------------------------------------------------------- top wells ----


def _rank_column(wells: pd.DataFrame, key: str) -> str:
    z = f"robust_z_{key}"
    return z if z in wells.columns and wells[z].notna().any() else f"mean_prob_{key}"


def rank_top_wells(wells: pd.DataFrame, key: str, count: int) -> pd.DataFrame:
    """Sample wells (controls are the known answer) with the highest robust z, else mean."""
    roles = _column(wells, "role")
    samples = wells[[_missing(r) or str(r) not in ("negative", "positive", "empty") for r in roles]]
    column = _rank_column(wells, key)
    return samples[samples[column].notna()].sort_values(column, ascending=False).head(count)


def _best_fields(predictions: pd.DataFrame, picks: dict[str, pd.DataFrame]) -> dict[tuple, pd.DataFrame]:
    """(key, plate, well) -> the well's scored fields most probable for the class ``key``,
    for each well picked for it. Grouped once: a screen has tens of picks and a million fields."""
    wanted = {(plate, well) for top in picks.values() for plate, well in zip(top["plate"], top["well"])}
    scored = predictions[predictions["error"].isna()]
    in_picked = [(plate, well) in wanted for plate, well in zip(scored["plate"], scored["well"])]
    by_well = dict(iter(scored[in_picked].groupby(["plate", "well"], sort=False)))
    return {(key, plate, well): by_well.get((plate, well), scored.iloc[:0]).sort_values(f"prob_{key}", ascending=False)
            .head(FIELDS_PER_WELL) for key, top in picks.items() for plate, well in zip(top["plate"], top["well"])}


def top_wells_section(wells, predictions, classes, keys, load_fields, count) -> str:
    picks = {key: rank_top_wells(wells, key, count) for key in keys}
    fields = _best_fields(predictions, picks)
    ids = sorted({str(i) for chosen in fields.values() for i in chosen["image_id"]})
    thumbs = _load_thumbnails(load_fields, ids)
    extra = [c for c in wells.columns if c not in WELL_COLUMNS and not c.startswith(WELL_PREFIXES)]
    parts = ["<h2>Top wells per class</h2><p class=note>Sample wells ranked by robust z against their plate's "
             "negative controls where any plate has them (then wells without one are left out), else by mean "
             "probability; the best fields of each well shown.</p>"]
    for name, key in zip(classes, keys):
        rows = []
        for row in picks[key].to_dict("records"):
            chosen = fields[(key, row["plate"], row["well"])]
            images = "".join(f'<figure><img alt="{_e(i)}" title="{_e(i)}" src="{thumbs[str(i)]}">'
                             f"<figcaption>{_num(p)}</figcaption></figure>" if str(i) in thumbs
                             else f"<figure class=none><figcaption>{_e(i)}: {_num(p)}</figcaption></figure>"
                             for i, p in zip(chosen["image_id"], chosen[f"prob_{key}"]))
            rows.append([_e(row["plate"]), _e(row["well"]), *(_e(row.get(c)) for c in extra),
                         _num(row.get(f"mean_prob_{key}")), _num(row.get(f"robust_z_{key}")),
                         f'<div class="thumbs">{images}</div>'])
        header = ["plate", "well", *extra, "mean prob", "robust z", "fields (probability)"]
        parts.append(f"<h3>{_e(name)}</h3>" + (_table(header, rows, 2 + len(extra)) if rows
                                                 else "<p class=note>no scored sample wells</p>"))
    return "".join(parts)


# ------------------------------------------------------- whole-run parts ----


def totals_html(predictions: pd.DataFrame, wells: pd.DataFrame) -> str:
    failed = int(predictions["error"].notna().sum())
    flagged = sum(bool(f) for f in _flag_lists(predictions))
    plates = predictions["plate"].dropna().nunique() if "plate" in predictions.columns else 0
    items = [("images", len(predictions)), ("scored", len(predictions) - failed), ("failed", failed),
             ("QC-flagged", flagged), ("plates", max(plates, wells["plate"].nunique() if len(wells) else 0))]
    return '<p class="totals">' + "".join(f"<span>{k}: <b>{v}</b></span>" for k, v in items) + "</p>"


def class_summary(predictions: pd.DataFrame, classes: Sequence[str], keys: Sequence[str]) -> str:
    """Per class over all scored images, plated or not: positives and mean probability."""
    scored = predictions[predictions["error"].isna()]
    positive = positive_matrix(scored, len(classes)) if "labels" in scored.columns else None
    rows = []
    for c, (name, key) in enumerate(zip(classes, keys)):
        n_pos = "–" if positive is None else str(int(positive[:, c].sum()))
        probs = scored[f"prob_{key}"] if f"prob_{key}" in scored.columns else []
        rows.append([_e(name), n_pos, _num(np.mean(probs) if len(probs) else np.nan, 3)])
    return "<h2>Per class</h2>" + _table(["class", "images positive", "mean probability"], rows)


def problem_list(predictions: pd.DataFrame, limit: int = MAX_LISTED) -> str:
    """Every failed or QC-flagged image with its reason, up to ``limit`` rows."""
    flags = _flag_lists(predictions)
    bad = [i for i, (error, fs) in enumerate(zip(_column(predictions, "error"), flags)) if fs or not _missing(error)]
    frame = predictions.iloc[bad[:limit]]
    rows = [[f'<span title="{_e(r.get("source"))}">{_e(r.get("image_id"))}</span>', _e(r.get("plate")),
             _e(r.get("well")), _e(r.get("field")), _e(r.get("error")), _e(r.get("error_detail")),
             _e(";".join(flags[i]))] for i, r in zip(bad, frame.to_dict("records"))]
    body = _table(["image", "plate", "well", "field", "error", "detail", "QC flags"], rows, 7) if rows else "none"
    more = f"<p class=note>… and {len(bad) - limit} more not listed.</p>" if len(bad) > limit else ""
    return f"<h2>Failed and QC-flagged images ({len(bad)})</h2>{body}{more}"


def _plate_stats(plates: pd.DataFrame, plate, classes: Sequence[str]) -> pd.DataFrame:
    """One plate's rows of the per-class statistics, in class order."""
    if plates.empty or "plate" not in plates.columns:
        return plates.iloc[:0]
    order = {name: i for i, name in enumerate(classes)}
    return plates[plates["plate"] == plate].sort_values("class", key=lambda c: c.map(order), kind="stable")


def render_report(predictions, wells, plates, classes, stain_names, load_fields=None,
                  title: str = "protein-ray plate report", top_wells: int = 5) -> str:
    """The report page as a string (``write_report`` writes it)."""
    keys = class_keys(classes)
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>",
             totals_html(predictions, wells),
             f"<p class=note>Stains: {_e(', '.join(map(str, stain_names)))}. Z′ legend: "
             '<span class="good">≥ 0.5 excellent</span> <span class="marginal">0–0.5 marginal</span> '
             '<span class="bad">&lt; 0 unusable</span>.</p>',
             class_summary(predictions, classes, keys)]
    for plate, plate_wells in (wells.groupby("plate", sort=True) if len(wells) else []):
        parts.append(plate_section(plate, plate_wells.reset_index(drop=True), predictions[predictions["plate"] == plate],
                                   _plate_stats(plates, plate, classes), classes, keys))
    if len(wells):
        parts.append(top_wells_section(wells, predictions, classes, keys, load_fields, top_wells))
    parts.append(problem_list(predictions))
    return "".join(parts) + "</body></html>"


def write_report(uri: str, predictions: pd.DataFrame, wells: pd.DataFrame, plates: pd.DataFrame,
                 classes: Sequence[str], stain_names: Sequence[str],
                 load_fields: Callable[[list[str]], dict[str, np.ndarray]] | None = None,
                 title: str = "protein-ray plate report", top_wells: int = 5) -> str:
    """Write one self-contained HTML file to ``uri`` (local path or s3://, atomically) and return ``uri``.
    ``load_fields(image_ids)`` returns float32 (H, W, stains) images on 0..1 for the ids it could
    read; without it the top wells are listed without thumbnails."""
    page = render_report(predictions, wells, plates, classes, stain_names, load_fields, title, top_wells)
    storage.write_text(uri, page)
    logger.info("report written to %s (%.1f MB)", uri, len(page) / 1e6)
    return uri
