"""The HTML plate report: content checked in the markup, drawing checked in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import binary_erosion

from protein_ray import storage
from protein_ray.plates import class_keys, parse_well
from protein_ray.report import render_report, thumbnail_png, write_report

CLASSES = ["Nucleoplasm", "Nucleoli fibrillar center", "Mitochondria"]
KEYS = class_keys(CLASSES)
STAINS = ["microtubules", "protein", "nucleus"]
ROWS, COLUMNS = "ABCDEFGH", range(1, 13)
FAILED = {"PL1_C05_f1": ("unreadable", "not an image file"), "PL1_D06_f2": ("truncated", "PNG stream ends early"),
          "loose_3": ("missing_stain", "no blue file")}
FLAGGED = {"PL1_E03_f1": "blurred", "PL1_F04_f2": "saturated;empty"}
Z_PRIME = [0.72, 0.31, -0.4]


def well_mean(well: str, c: int) -> float:
    """Negatives (column 1) near 0, positives (column 12) near 1, B07 the strongest sample; the other
    samples of each class in their own band of values, so each heatmap has shades no other one has."""
    row, column = parse_well(well)
    if well == "B07":
        return 1.0
    if well == "B08":
        return 0.0
    return 0.02 + 0.01 * row if column == 0 else 0.95 if column == 11 else 0.1 + 0.3 * c + 0.02 * ((row + column) % 10)


def make_wells(plate: str = "PL1", drop: tuple[str, ...] = ("H11",)) -> pd.DataFrame:
    rows = []
    for well in (f"{r}{c:02d}" for r in ROWS for c in COLUMNS):
        if well in drop:  # a well nobody imaged: drawn grey
            continue
        column = int(well[1:])
        row = {"plate": plate, "well": well, "role": "negative" if column == 1 else "positive" if column == 12
               else "sample", "compound": f"cpd-{well}", "images_scored": 2, "images_failed": 0, "images_flagged": 0}
        for c, key in enumerate(KEYS):
            mean = well_mean(well, c)
            row |= {f"mean_prob_{key}": mean, f"median_prob_{key}": mean, f"frac_pos_{key}": float(mean > 0.5),
                    f"robust_z_{key}": (mean - 0.05) / 0.02}
        rows.append(row)
    return pd.DataFrame(rows)


def make_predictions(wells: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for record in wells.to_dict("records"):
        for field in (1, 2):
            image_id = f"{record['plate']}_{record['well']}_f{field}"
            rows.append({"image_id": image_id, "source": f"/data/{image_id}.tif", "plate": record["plate"],
                         "well": record["well"], "field": field, "qc_flags": FLAGGED.get(image_id, ""),
                         **{f"prob_{k}": record[f"mean_prob_{k}"] * (1.0 if field == 1 else 0.9) for k in KEYS}})
    rows.append({"image_id": "loose_3", "source": "/data/loose_3.png", "plate": None, "well": None, "field": None})
    frame = pd.DataFrame(rows)
    frame["error"] = [FAILED.get(i, (None,))[0] for i in frame["image_id"]]
    frame["error_detail"] = [FAILED.get(i, (None, None))[1] for i in frame["image_id"]]
    frame.loc[frame["error"].notna(), [f"prob_{k}" for k in KEYS]] = np.nan
    frame["labels"] = [None if isinstance(e, str) else " ".join(str(c) for c, k in enumerate(KEYS) if p[f"prob_{k}"] > 0.5)
                       for e, p in zip(frame["error"], frame.to_dict("records"))]
    frame["qc_flags"] = frame["qc_flags"].fillna("")
    return frame


def make_plates(plate: str = "PL1") -> pd.DataFrame:
    return pd.DataFrame([{"plate": plate, "class": name, "n_negative": 8, "n_positive": 8, "z_prime": z,
                          "robust_z_prime": z + 0.05, "edge_mean": 0.4, "inner_mean": 0.3, "edge_effect": 0.1}
                         for name, z in zip(CLASSES, Z_PRIME)])


def load_fields(image_ids: list[str]) -> dict[str, np.ndarray]:
    """Pure red first stain, so a thumbnail's colour can be checked; one id unreadable."""
    images = {}
    for image_id in image_ids:
        if image_id != "PL1_B07_f2":
            image = np.zeros((200, 160, len(STAINS)), np.float32)
            image[..., 0] = np.linspace(0.2, 1.0, 160, dtype=np.float32)
            images[image_id] = image
    return images


def report(load=None, **changes) -> str:
    wells = changes.pop("wells", make_wells())
    inputs = {"predictions": make_predictions(wells), "wells": wells, "plates": make_plates(), **changes}
    return render_report(classes=CLASSES, stain_names=STAINS, load_fields=load, **inputs)


def heatmaps(page: str) -> list[str]:
    return re.findall(r'<figure class="heatmap">.*?</figure>', page)


def well_rect(svg: str, well: str) -> dict[str, str]:
    tag = re.search(rf'<rect class="well" data-well="{well}"[^>]*>', svg)[0]
    return dict(re.findall(r'(\w[\w-]*)="([^"]*)"', tag))


# ------------------------------------------------------------------ markup ----


def test_report_is_self_contained():
    page = report(load_fields)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_each_heatmap_has_one_rect_per_well_laid_out_like_the_plate():
    maps = heatmaps(report())
    assert len(maps) == len(CLASSES)
    for svg in maps:
        assert svg.count('<rect class="well"') == 96
        a01, a02, b01, b07 = (well_rect(svg, w) for w in ("A01", "A02", "B01", "B07"))
        step = float(a02["x"]) - float(a01["x"])
        assert step > 0 and float(b01["y"]) - float(a01["y"]) == step and b01["x"] == a01["x"]
        # B07 is row index 1 (down), column index 6 (across)
        assert float(b07["x"]) == float(a01["x"]) + 6 * step and float(b07["y"]) == float(a01["y"]) + step
        assert "H11: no data" in svg


def test_well_colours_follow_the_mean_and_missing_wells_are_grey():
    svg = heatmaps(report())[0]
    high, low, missing = (well_rect(svg, w)["fill"] for w in ("B07", "B08", "H11"))
    assert len({high, low, missing}) == 3
    assert missing == "#cccccc" and high == "#fde725" and low == "#440154"  # viridis ends
    samples = {well_rect(svg, f"{r}{c:02d}")["fill"] for r in ROWS for c in range(2, 12)}
    assert len(samples) >= 8


def test_controls_are_marked_and_tooltips_say_role_and_robust_z():
    svg = heatmaps(report())[0]
    assert "stroke" in well_rect(svg, "A01") and "stroke" in well_rect(svg, "A12")
    assert "stroke" not in well_rect(svg, "A05")
    assert len(re.findall(r'<text class="ctl"[^>]*>N</text>', svg)) == 8
    assert len(re.findall(r'<text class="ctl"[^>]*>P</text>', svg)) == 8
    assert "<title>B07 · sample · mean 1.00 · robust z 47.50</title>" in svg


def test_plate_table_prints_z_prime_with_its_verdict():
    page = report()
    assert '<span class="good">0.72</span>' in page and '<span class="good">0.77</span>' in page
    assert '<span class="marginal">0.31</span>' in page and '<span class="bad">-0.40</span>' in page
    assert "≥ 0.5 excellent" in page and "&lt; 0 unusable" in page


def test_qc_table_counts_failures_per_reason_and_flags_per_flag():
    qc = re.search(r"<h3>Image QC</h3>(<table>.*?</table>)", report())[1]
    header = re.findall(r"<th[^>]*>(.*?)</th>", qc)
    values = dict(zip(header, re.findall(r"<td[^>]*>(.*?)</td>", qc)))
    assert values == {"fields": "190", "scored": "188", "failed: truncated": "1", "failed: unreadable": "1",
                      "flagged: blurred": "1", "flagged: empty": "1", "flagged: saturated": "1"}


def test_failed_and_flagged_images_are_listed_with_reasons():
    page = report()
    listing = page[page.index("<h2>Failed and QC-flagged images (5)"):]
    for image_id, (reason, detail) in FAILED.items():
        assert re.search(rf"<td class=t><span[^>]*>{image_id}</span>.*?<td class=t>{reason}</td>"
                         rf"<td class=t>{detail}</td>", listing)
    for image_id, flags in FLAGGED.items():
        assert re.search(rf">{image_id}</span>.*?<td class=t>{flags}</td></tr>", listing)
    assert "PL1_A05_f1" not in listing
    assert '<span>failed: <b>3</b></span>' in page and '<span>QC-flagged: <b>2</b></span>' in page


def test_the_listing_is_capped():
    wells = make_wells()
    predictions = make_predictions(wells)
    predictions = pd.concat([predictions.assign(image_id=predictions["image_id"] + f"_{k}") for k in range(6)])
    predictions["qc_flags"] = "blurred"
    page = render_report(predictions, wells, make_plates(), CLASSES, STAINS)
    listing = page[page.index("<h2>Failed and QC-flagged images (1146)"):]
    assert listing.count("<tr>") == 501 and "… and 646 more not listed." in listing


def test_top_wells_show_thumbnails_only_when_fields_can_be_loaded():
    page = report(load_fields)
    top = page[page.index("<h2>Top wells per class"):page.index("<h2>Failed")]
    first = top.split("<h3>")[1]
    assert first.startswith("Nucleoplasm</h3>")
    assert "<td class=t>B07</td><td class=t>cpd-B07</td><td>1.00</td><td>47.50</td>" in first
    assert "cpd-A12" not in top  # controls are not hits
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', top)
    assert len(uris) >= len(CLASSES) * 5
    thumb = Image.open(io.BytesIO(base64.b64decode(uris[0]))).convert("RGB")
    assert max(thumb.size) == 96
    red, green, blue = np.asarray(thumb, dtype=float).reshape(-1, 3).mean(axis=0)
    assert red > 100 and green < 5 and blue < 5  # the first stain drawn red
    assert "PL1_B07_f2: 0.90" in first  # the unreadable field: named, no image
    assert "data:image" not in report(None)


def test_a_top_well_shows_its_most_probable_scored_fields_first():
    wells = make_wells()
    predictions = make_predictions(wells)  # B07: field 1 at 1.0, field 2 at 0.9 for the first class
    b07 = predictions[predictions["image_id"] == "PL1_B07_f1"].iloc[0].to_dict()
    more = [b07 | {"image_id": "PL1_B07_f3", "field": 3, f"prob_{KEYS[0]}": 0.95},
            b07 | {"image_id": "PL1_B07_f4", "field": 4, f"prob_{KEYS[0]}": 0.5},  # fourth best: not shown
            b07 | {"image_id": "PL1_B07_f5", "field": 5, f"prob_{KEYS[0]}": 0.99, "error": "truncated"}]
    page = render_report(pd.concat([predictions, pd.DataFrame(more)], ignore_index=True), wells, make_plates(),
                         CLASSES, STAINS)
    first_class = page[page.index("<h2>Top wells per class"):].split("<h3>")[1]
    row = next(row for row in first_class.split("<tr>") if "<td class=t>B07</td>" in row)
    assert re.findall(r"(PL1_B07_f\d): ([\d.]+)</figcaption>", row) == [
        ("PL1_B07_f1", "1.00"), ("PL1_B07_f3", "0.95"), ("PL1_B07_f2", "0.90")]


def test_a_failed_field_load_costs_its_thumbnails_not_the_others():
    from protein_ray.report import _load_thumbnails

    def failing_for_f3(image_ids):  # a load holding f3 fails (storage down); the others succeed
        if "f3" in image_ids:
            raise OSError("storage unavailable")
        return load_fields(image_ids)

    ids = [f"f{i}" for i in range(7)]
    thumbs = _load_thumbnails(failing_for_f3, ids, chunk=2)  # loads: f0 f1 | f2 f3 | f4 f5 | f6
    assert sorted(thumbs) == ["f0", "f1", "f4", "f5", "f6"]
    assert all(uri.startswith("data:image/png;base64,") for uri in thumbs.values())


def test_thumbnails_draw_stains_in_their_colours():
    def colour(stains: int, lit: int) -> tuple[int, ...]:
        image = np.zeros((300, 500, stains), np.float32)
        image[..., lit] = 1.0
        thumb = Image.open(io.BytesIO(thumbnail_png(image)))
        assert thumb.size == (96, 58)
        return thumb.convert("RGB").getpixel((40, 20))

    assert colour(4, 3) == (255, 255, 0) and colour(4, 2) == (0, 0, 255) and colour(3, 1) == (0, 255, 0)
    assert colour(1, 0) == (255, 255, 255)


def test_a_failing_field_loader_costs_the_thumbnails_not_the_report():
    def broken(image_ids):
        raise OSError("bucket unreachable")

    page = report(broken)
    assert "data:image" not in page and "<td class=t>B07</td>" in page


def test_edge_figure_compares_edge_and_inner_wells_per_role():
    wells = make_wells()
    page = report()
    figure = page[page.index("<h3>Edge vs inner wells"):page.index("<h2>Top wells")].split("<figure>")[1]
    assert figure.startswith("<figcaption>Nucleoplasm</figcaption>")
    edge = [p[0] in (0, 7) or p[1] in (0, 11) for p in map(parse_well, wells["well"])]
    samples = wells[(wells["role"] == "sample").to_numpy()]
    for where, name in ((edge, "edge"), ([not e for e in edge], "inner")):
        chosen = samples[np.asarray(where)[(wells["role"] == "sample").to_numpy()]]
        assert f"<title>sample {name}: mean {chosen['mean_prob_nucleoplasm'].mean():.2f} ({len(chosen)} wells)" \
            in figure
    assert "<title>negative edge: mean 0.06 (8 wells)" in figure and "<title>negative inner: mean – (0 wells)" in figure


def test_user_text_is_escaped():
    wells = make_wells(plate="<i>P&1</i>")
    wells["compound"] = '<script>alert("x")</script>'
    predictions = make_predictions(wells)
    predictions.loc[0, "error"], predictions.loc[0, "error_detail"] = "unreadable", "<u>bad</u> & worse"
    page = render_report(predictions, wells, make_plates("<i>P&1</i>"), CLASSES, STAINS, title="a <u> title")
    assert "<i>" not in page and "<script" not in page and "<u>" not in page
    assert "&lt;i&gt;P&amp;1&lt;/i&gt;" in page and "&lt;u&gt;bad&lt;/u&gt; &amp; worse" in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert '<span class="good">0.72</span>' in page  # the plate's statistics still matched to it


def test_a_384_well_plate_without_a_plate_map_or_controls():
    wells = make_wells().drop(columns=["role", "compound"] + [f"robust_z_{k}" for k in KEYS])
    wells = pd.concat([wells, wells.iloc[:1].assign(well="P24", **{f"mean_prob_{k}": np.nan for k in KEYS})])
    empty_stats = pd.DataFrame(columns=make_plates().columns)
    page = render_report(make_predictions(wells), wells, empty_stats, CLASSES, STAINS)
    maps = heatmaps(page)
    assert len(maps) == 3 and all(svg.count('<rect class="well"') == 384 for svg in maps)
    assert well_rect(maps[0], "P24")["fill"] == "#cccccc" and 'class="ctl"' not in maps[0]
    assert "(384 wells)" in page and "<h2>Top wells per class" in page and "No control statistics" in page


def test_loose_images_without_plates_get_totals_classes_and_failures():
    predictions = make_predictions(make_wells()).assign(plate=None, well=None)
    empty_wells = pd.DataFrame(columns=["plate", "well", "images_scored", "images_failed"])
    page = render_report(predictions, empty_wells, pd.DataFrame(), CLASSES, STAINS, load_fields=load_fields)
    assert '<section class="plate"' not in page and "Top wells" not in page
    assert "<span>images: <b>191</b></span>" in page and "<span>plates: <b>0</b></span>" in page
    summary = page[page.index("<h2>Per class"):page.index("<h2>Failed")]
    assert "<td class=t>Nucleoplasm</td><td>18</td><td>0.235</td>" in summary  # 8 positive wells and B07, 2 fields
    assert all(image_id in page for image_id in FAILED)


def test_write_report_to_a_local_path(tmp_path):
    wells = make_wells()
    uri = str(tmp_path / "out" / "report.html")
    assert write_report(uri, make_predictions(wells), wells, make_plates(), CLASSES, STAINS) == uri
    assert (tmp_path / "out" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.html"]  # no temporary left behind


@pytest.mark.s3
def test_write_report_to_s3(s3_bucket):
    wells = make_wells()
    uri = f"{s3_bucket}/screen/report.html"
    write_report(uri, make_predictions(wells), wells, make_plates(), CLASSES, STAINS, title="on S3")
    assert "<h1>on S3</h1>" in storage.read_text(uri)


# ----------------------------------------------------------------- browser ----


def chromium(html_path, png_path) -> list[str]:
    """Screenshot ``html_path`` in headless Chromium; returns the page's console messages.
    The report has no script, so any console message at all is a fault."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("no `chromium` binary: `make browser` installs Debian's package (needs root)")
    run = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                          f"--screenshot={png_path}", "--window-size=1400,2000", f"file://{html_path}"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    # Chromium's own dbus/GPU warnings go to stderr too; only CONSOLE lines come from the page.
    return [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


def test_chromium_draws_the_heatmaps_without_console_errors(tmp_path):
    page = report(load_fields)
    (tmp_path / "report.html").write_text(page)
    console = chromium(tmp_path / "report.html", tmp_path / "shot.png")
    assert console == []
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB")).astype(int)
    # The first class's sample wells (B07, B08 aside) have shades no other heatmap has.
    fills = set(re.findall(r'fill="(#[0-9a-f]{6})"><title>(?!B0[78])[A-H]\d\d · sample ·', heatmaps(page)[0]))
    found = [np.argwhere(binary_erosion(np.abs(shot - rgb).max(axis=2) <= 2, np.ones((8, 8))))
             for rgb in ([int(f[i:i + 2], 16) for i in (1, 3, 5)] for f in fills)]
    found = [where for where in found if len(where)]  # solid well-sized squares only, not the colour bar
    assert len(fills) >= 8 and len(found) >= 0.9 * len(fills)  # the wells' viridis shades are on screen
    top, left = np.min([w.min(axis=0) for w in found], axis=0)
    bottom, right = np.max([w.max(axis=0) for w in found], axis=0)
    step = float(well_rect(heatmaps(page)[0], "A02")["x"]) - float(well_rect(heatmaps(page)[0], "A01")["x"])
    # Sample wells span columns 2-11 across and rows A-H down: 9 and 7 well steps on screen.
    assert abs((right - left) - 9 * step) <= step and abs((bottom - top) - 7 * step) <= step


def test_the_console_check_catches_a_script_error(tmp_path):
    (tmp_path / "broken.html").write_text(report().replace("</body>", "<script>undefined_fn()</script></body>"))
    console = chromium(tmp_path / "broken.html", tmp_path / "shot.png")
    assert any("undefined_fn is not defined" in line for line in console)
