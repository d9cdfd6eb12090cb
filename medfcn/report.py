"""A QC page of an inference output folder: ``report.html``, one row per scan, flagged scans first.

``medfcn report OUT_DIR`` (or ``medfcn infer ... --report``) reads what ``medfcn infer`` wrote
there (``volumes.json``, the masks, ``failures.json``) and the scans they name, and writes one
self-contained HTML file (images embedded as PNG, no network access needed) with, per scan:

- a three-plane view (axial, coronal, sagittal) through the centre of the mask's foreground: the
  scan in grey (0.5-99.5 % window), each label's outline in its colour, in the radiological view
  viewers use (the patient's right on the left, anterior and superior up), at the true aspect ratio;
- the volume of each label (mm^3), the uncertainty score (``--uncertainty``), the voxel size;
- flags: a label missing from the mask; a volume outside the 1-99 % range of the bundle's
  training volumes (its ``metadata.json``: the training-data profile ``medfcn package`` writes,
  else the label volumes ``medfcn plan`` writes); a voxel size or field of view outside the
  training range (beyond the margin ``medfcn infer`` warns at); an uncertainty above the batch's upper fence
  (Q3 + 1.5 IQR of the scores, from 5 scans on).

The table sorts by any column (click its header); scans that failed (``failures.json``) are
listed above it. Example::

    from medfcn.report import write_report
    write_report("out/", bundle="bundles/hippocampus_fcn")
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medfcn.data.dicom import gdcm_series_files, series_files
from medfcn.data.profile import MARGIN, bundle_profile, geometry_ras
from medfcn.data.readers import quiet_itk, sitk_affine_ras
from medfcn.errors import UserError
from medfcn.io import atomic_write_text, refuse_existing
from medfcn.masks import label_colour
from medfcn.outputs import output_lock, path_text

__all__ = ["REPORT_NAME", "ScanReview", "check_report_target", "review_scans", "write_report"]

REPORT_NAME = "report.html"
_PLANES = ("axial", "coronal", "sagittal")


@dataclass
class ScanReview:
    """One scan's row of the report: its ``volumes.json`` row, its flags and its picture (PNG)."""

    row: dict
    flags: list[str] = field(default_factory=list)
    png: bytes = b""


def check_report_target(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """UserError when ``out_dir/report.html`` exists and ``overwrite`` is not given (before a run
    that would write it, so that nothing is computed for a page that cannot be written)."""
    refuse_existing([Path(out_dir) / REPORT_NAME], overwrite)


def write_report(
    out_dir: str | os.PathLike,
    bundle: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` for the scans ``medfcn infer`` segmented into ``out_dir``.

    Args:
        out_dir: an inference output folder (``volumes.json``, masks).
        bundle: the bundle that segmented them, for the volume and voxel-size flags (its
            ``metadata.json``); without it only missing labels and uncertainty are flagged.
        overwrite: replace an existing ``report.html``.
        progress: gets a line per scan drawn.

    Returns:
        The report's path.

    Raises:
        UserError: no ``volumes.json``, a scan or mask that cannot be read, an existing report
            without ``overwrite``. Nothing is written then.
    """
    out = Path(out_dir)
    rows, failures = _read_tables(out)
    with output_lock(out, "medfcn report"):
        check_report_target(out, overwrite)
        class_names = _class_names(rows)
        reviews = review_scans(rows, out, class_names, _bundle_limits(bundle), progress)
        page = report_html(reviews, failures, class_names, bundle)
        atomic_write_text(page, out / REPORT_NAME)
    return out / REPORT_NAME


def _read_tables(out: Path) -> tuple[list[dict], list[dict]]:
    """``volumes.json``'s rows and ``failures.json``'s (none when absent)."""
    volumes = out / "volumes.json"
    if not volumes.is_file():
        raise UserError(
            f"{volumes}: not found; run medfcn infer ... --out {out} first (medfcn report reads its output)."
        )
    tables = []
    for path in (volumes, out / "failures.json"):
        try:
            tables.append(json.loads(path.read_text()) if path.is_file() else [])
        except ValueError as err:
            raise UserError(f"{path}: not valid JSON ({err}); run medfcn infer again into a new --out.") from err
    if not isinstance(tables[0], list) or not all(isinstance(r, dict) and "input" in r for r in tables[0]):
        raise UserError(f"{volumes}: not a medfcn infer table (a list of rows with input and mask).")
    return tables[0], tables[1]


def _class_names(rows: list[dict]) -> list[str]:
    """The class names the rows hold volumes of (``<name>_mm3`` columns), in column order."""
    return [key[: -len("_mm3")] for key in (rows[0] if rows else {}) if key.endswith("_mm3")]


@dataclass
class _Limits:
    """What a bundle says its training data looked like: per class name the 1 % and 99 %
    quantiles of its volume (mm^3), and the ranges of voxel size and field of view
    (``{"voxel size": (min, max), "field of view": ...}``, mm, R-L, A-P, S-I)."""

    volumes: dict[str, tuple[float, float]] = field(default_factory=dict)
    geometry: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _bundle_limits(bundle: str | os.PathLike | None) -> _Limits:
    """The bundle's :class:`_Limits` from its ``metadata.json``: the training-data profile
    (``medfcn package``), else the label volumes ``medfcn plan`` writes; empty without a bundle."""
    if bundle is None:
        return _Limits()
    meta_file = Path(bundle) / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise UserError(f"{meta_file}: not found; name the bundle folder that segmented the scans.")
    profile = bundle_profile(meta_file) or {}  # checked: one line for a malformed profile
    planned = json.loads(meta_file.read_text()).get("label_volumes_mm3")  # medfcn plan's, where no profile
    volumes = profile.get("volume_mm3") or (planned if isinstance(planned, dict) else {})
    limits = _Limits()
    for name, spread in volumes.items():
        quantiles = spread.get("quantiles") if isinstance(spread, dict) else None
        try:
            limits.volumes[name] = (float(quantiles["1"]), float(quantiles["99"]))
        except (TypeError, KeyError, ValueError):  # none recorded (an older bundle): no volume flag
            continue
    for what, key in (("voxel size", "voxel_size_mm"), ("field of view", "field_of_view_mm")):
        if key in profile:
            limits.geometry[what] = tuple(np.asarray(profile[key][end], dtype=float) for end in ("min", "max"))
    return limits


def review_scans(
    rows: list[dict],
    out: Path,
    class_names: Sequence[str],
    limits: _Limits,
    progress: Callable[[str], None] | None = None,
) -> list[ScanReview]:
    """A :class:`ScanReview` per row of ``out``'s tables: its flags and its three-plane picture, in row order."""
    fence = _upper_fence([r.get("uncertainty") for r in rows])
    reviews = []
    for index, row in enumerate(rows, start=1):
        scan, mask = _load_pair(row, out)
        review = ScanReview(row, _flags(row, class_names, limits, mask, fence))
        review.png = three_planes_png(scan, mask, class_names)
        reviews.append(review)
        if progress:
            progress(f"[{index}/{len(rows)}] {_scan_name(row)}: {'; '.join(review.flags) or 'no flag'}")
    return reviews


def _upper_fence(scores: Sequence[float | None]) -> float | None:
    """The score above which a scan's uncertainty is far above the batch's: Tukey's upper fence
    Q3 + 1.5 IQR, and at least 20 % above the median (a batch of near-equal scores has a fence
    so close to them that it would flag noise). None for fewer than 5 scores (None: no score)."""
    values = np.array([s for s in scores if s is not None], dtype=float)
    if values.size < 5:
        return None
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float(max(q3 + 1.5 * (q3 - q1), 1.2 * median))


def _flags(row: dict, class_names: Sequence[str], limits: _Limits, mask: sitk.Image, fence: float | None) -> list[str]:
    """What about a scan a reviewer should look at, one short phrase each."""
    flags = [f"no {name}" for name in class_names if not row.get(f"{name}_mm3")]
    for name in class_names:
        volume = row.get(f"{name}_mm3") or 0
        low, high = limits.volumes.get(name, (None, None))
        if volume and low is not None and not low <= volume <= high:
            flags.append(f"{name} volume {volume:.0f} mm3 outside training 1-99 % ({low:.0f}-{high:.0f})")
    flags += _geometry_flags(mask, limits)
    score = row.get("uncertainty")
    if fence is not None and score is not None and score > fence:
        flags.append(f"uncertainty {score:.3f} far above the batch's (over {fence:.3f})")
    return flags


def _geometry_flags(mask: sitk.Image, limits: _Limits) -> list[str]:
    """The voxel size and field of view (RAS axes) that lie outside the training ranges beyond
    the margin ``medfcn infer`` warns at (:data:`medfcn.data.profile.MARGIN`)."""
    fov, voxel = geometry_ras(sitk_affine_ras(mask), mask.GetSize())
    flags = []
    for what, values in (("voxel size", voxel), ("field of view", fov)):
        if what in limits.geometry:
            low, high = limits.geometry[what]
            if np.any(values < low / MARGIN) or np.any(values > high * MARGIN):
                flags.append(f"{what} {' x '.join(f'{v:.3g}' for v in values)} mm unlike training")
    return flags


def _scan_name(row: dict) -> str:
    """The name a row's mask is written under, without its folder (the case)."""
    return Path(str(row.get("mask") or row["input"])).name


def _load_pair(row: dict, out: Path) -> tuple[sitk.Image, sitk.Image]:
    """The scan (first channel) and its mask (in ``out``, the folder the report is of) as
    SimpleITK images, both turned to LPS axes.

    Raises:
        UserError: either file is gone or cannot be read, or they are not on one grid.
    """
    scan_path, mask_path = Path(row["input"]), out / Path(row["mask"]).name
    scan, mask = _read_image(scan_path), _read_image(mask_path)
    same_grid = scan.GetSize() == mask.GetSize() and all(
        np.allclose(getattr(scan, f"Get{what}")(), getattr(mask, f"Get{what}")(), atol=1e-3)
        for what in ("Spacing", "Origin", "Direction")
    )
    if not same_grid:
        raise UserError(
            f"{path_text(mask_path)}: not on its scan's grid ({path_text(scan_path)}); was the scan replaced? "
            "Run medfcn infer again."
        )
    return sitk.DICOMOrient(scan, "LPS"), sitk.DICOMOrient(mask, "LPS")


def _read_image(path: Path) -> sitk.Image:
    """A scan or mask file, or a DICOM series folder, as a 3D SimpleITK image (the first
    channel or volume of a multi-channel one)."""
    if not path.exists():
        raise UserError(
            f"{path_text(path)}: not found; medfcn report draws the scans where medfcn infer read them (a relative "
            "path: from the folder it ran in)."
        )
    try:
        with quiet_itk():
            if path.is_dir():
                files = series_files(path, gdcm_series_files(path) or [])
                image = sitk.ReadImage(files)
            else:
                image = sitk.ReadImage(str(path))
    except (RuntimeError, UserError) as err:
        raise UserError(f"{path_text(path)}: cannot be read to draw it ({str(err).splitlines()[0]}).") from err
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorIndexSelectionCast(image, 0)
    return image


def three_planes_png(scan: sitk.Image, mask: sitk.Image, class_names: Sequence[str], title: str = "") -> bytes:
    """Axial, coronal and sagittal planes through the foreground's centre (the scan's centre for
    an empty mask), each label outlined in its colour: a PNG about 660 x 240 pixels.

    ``scan`` and ``mask``: one grid, LPS axes (:func:`_load_pair`), arrays ``(z, y, x)``.
    """
    image = sitk.GetArrayViewFromImage(scan).astype(np.float32)
    labels = sitk.GetArrayViewFromImage(mask).astype(np.int64)
    spacing_zyx = np.asarray(scan.GetSpacing(), dtype=float)[::-1]
    centre = _centre(labels)
    low, high = np.percentile(image, [0.5, 99.5])
    figure = Figure(figsize=(6.6, 2.4), dpi=100, layout="constrained")
    for ax, plane in zip(figure.subplots(1, 3), _PLANES, strict=True):
        picture, outline, aspect = _plane(image, labels, centre, spacing_zyx, plane)
        ax.imshow(picture, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
        for value in range(1, len(class_names) + 1):
            if (outline == value).any() and min(outline.shape) > 1:  # a contour needs 2 x 2 points
                ax.contour(outline == value, levels=[0.5], colors=[label_colour(value)], linewidths=1.2)
        ax.set_title(plane, fontsize=9)
        ax.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """The voxel ``(z, y, x)`` at the centre of mass of the foreground, else of the grid."""
    where = np.argwhere(labels > 0)
    point = where.mean(axis=0) if len(where) else (np.asarray(labels.shape) - 1) / 2
    return tuple(int(round(v)) for v in point)


def _plane(
    image: np.ndarray, labels: np.ndarray, centre: tuple[int, int, int], spacing_zyx: np.ndarray, plane: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """One plane of the LPS arrays ``(z, y, x)`` as drawn: ``(picture, labels, aspect)``.

    Radiological view: columns run from the patient's right to left (x grows to the left in
    LPS); axial rows from anterior to posterior, coronal and sagittal rows from superior down.
    ``aspect``: the rows' spacing over the columns' (mm).
    """
    z, y, x = centre
    if plane == "axial":
        return image[z], labels[z], spacing_zyx[1] / spacing_zyx[2]
    if plane == "coronal":
        return image[::-1, y, :], labels[::-1, y, :], spacing_zyx[0] / spacing_zyx[2]
    return image[::-1, :, x], labels[::-1, :, x], spacing_zyx[0] / spacing_zyx[1]


def report_html(
    reviews: Sequence[ScanReview], failures: Sequence[dict], class_names: Sequence[str], bundle: object = None
) -> str:
    """The page: a summary, the failed scans, and the sortable table (flagged scans first)."""
    order = sorted(range(len(reviews)), key=lambda i: (-len(reviews[i].flags), i))
    flagged = sum(bool(r.flags) for r in reviews)
    summary = (
        f"{len(reviews)} scans, {flagged} flagged"
        + (f", {len(failures)} failed" if failures else "")
        + f"; bundle: {html.escape(path_text(bundle)) if bundle else 'not given (no volume or voxel-size flags)'}"
        + f"; written {datetime.datetime.now().isoformat(timespec='seconds')}"
    )
    legend = " ".join(
        f'<span class="key" style="border-color:{label_colour(k)}">{html.escape(name)}</span>'
        for k, name in enumerate(class_names, 1)
    )
    return _PAGE.format(
        summary=summary,
        legend=legend,
        failures=_failures_html(failures),
        header=_header_html(class_names),
        rows="\n".join(_row_html(reviews[i], class_names, position) for position, i in enumerate(order)),
    )


def _failures_html(failures: Sequence[dict]) -> str:
    if not failures:
        return ""
    items = "".join(
        f"<li><code>{html.escape(str(f.get('input')))}</code>: {html.escape(str(f.get('reason')))}</li>"
        for f in failures
    )
    return f'<h2>Failed scans</h2><ul class="failures">{items}</ul>'


def _header_html(class_names: Sequence[str]) -> str:
    columns = [("flags", "number"), ("scan", "text")]
    columns += [(f"{html.escape(name)} mm&sup3;", "number") for name in class_names]
    columns += [("uncertainty", "number"), ("voxel size mm", "text"), ("view", "none")]
    return "".join(f'<th data-type="{kind}">{label}</th>' for label, kind in columns)


def _row_html(review: ScanReview, class_names: Sequence[str], position: int) -> str:
    row = review.row
    flags = "".join(f"<li>{html.escape(flag)}</li>" for flag in review.flags)
    cells = [
        f'<td data-value="{len(review.flags)}"><ul class="flags">{flags}</ul></td>',
        f'<td data-value="{html.escape(_scan_name(row))}" title="{html.escape(str(row["input"]))}">'
        f"{html.escape(_scan_name(row))}</td>",
    ]
    for name in class_names:
        volume = row.get(f"{name}_mm3")
        cells.append(_number_cell(volume, "{:.0f}"))
    cells.append(_number_cell(row.get("uncertainty"), "{:.3f}"))
    cells.append(f"<td>{html.escape(str(row.get('spacing_mm', '')))}</td>")
    image = base64.b64encode(review.png).decode("ascii")
    cells.append(
        f'<td><img src="data:image/png;base64,{image}" alt="{html.escape(_scan_name(row))}: three planes"></td>'
    )
    state = "flagged" if review.flags else "clear"
    return f'<tr class="{state}" data-order="{position}">' + "".join(cells) + "</tr>"


def _number_cell(value: float | None, spec: str) -> str:
    if value is None or not np.isfinite(float(value)):
        return '<td data-value="">-</td>'
    return f'<td data-value="{float(value)!r}">{spec.format(float(value))}</td>'


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>medfcn QC report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }}
th {{ background: #f3f3f3; cursor: pointer; position: sticky; top: 0; user-select: none; }}
th[data-type="none"] {{ cursor: default; }}
th.asc::after {{ content: " \\25B2"; }}
th.desc::after {{ content: " \\25BC"; }}
tr.flagged td:first-child {{ background: #fde8e8; }}
ul.flags {{ margin: 0; padding-left: 1.1em; color: #a01818; font-size: 0.9em; min-width: 16em; max-width: 24em; }}
img {{ display: block; width: 600px; height: auto; }}
.key {{ border-left: 14px solid; padding-left: 4px; margin-right: 1em; }}
</style>
</head>
<body>
<h1>medfcn QC report</h1>
<p>{summary}</p>
<p>Outlines: {legend}. Views: radiological (the patient's right on the left), through the centre of
the mask. Flags: a label missing; a volume outside 1-99 % of the bundle's training volumes; a voxel
size or field of view unlike training (as medfcn infer warns); an uncertainty above the batch's
Q3 + 1.5 IQR and 20 % above its median (5 scans or more). Click a
column's header to sort by it.</p>
{failures}
<table id="scans">
<thead><tr>{header}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
<script>
(function () {{
  var table = document.getElementById("scans");
  var headers = table.tHead.rows[0].cells;
  function key(row, column, kind) {{
    var cell = row.cells[column];
    var value = cell.getAttribute("data-value");
    if (value === null) value = cell.textContent;
    if (kind === "number") return value === "" ? -Infinity : parseFloat(value);
    return value.toLowerCase();
  }}
  Array.prototype.forEach.call(headers, function (th, column) {{
    var kind = th.getAttribute("data-type");
    if (kind === "none") return;
    th.addEventListener("click", function () {{
      var descending = !th.classList.contains("desc");
      Array.prototype.forEach.call(headers, function (h) {{ h.classList.remove("asc", "desc"); }});
      th.classList.add(descending ? "desc" : "asc");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {{
        var x = key(a, column, kind), y = key(b, column, kind);
        var order = x < y ? -1 : x > y ? 1 : 0;
        if (descending) order = -order;
        return order || a.getAttribute("data-order") - b.getAttribute("data-order");
      }});
      rows.forEach(function (row) {{ body.appendChild(row); }});
    }});
  }});
}})();
</script>
</body>
</html>
"""
