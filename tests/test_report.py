"""medfcn report: the QC page's rows, flags, pictures and orientation, and the page in a real
browser (headless Chromium through Selenium; skipped with the reason where it is not installed:
.ci/run installs it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medfcn.errors import UserError
from medfcn.report import REPORT_NAME, _load_pair, _plane, write_report

from .conftest import BUNDLE, REPO, need_module

GRID = (30, 34, 26)


def _case(folder, name, labels, spacing=1.0):
    """A scan and its mask (RAS, ``spacing`` mm) in ``folder``; the row medfcn infer writes."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    rng = np.random.default_rng(len(name))
    scan = (rng.normal(0, 0.1, GRID) + (labels > 0)).astype(np.float32)
    (folder / "scans").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(scan, affine), folder / "scans" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), folder / "out" / f"{name}.nii.gz")
    voxel = spacing**3
    return {
        "input": str(folder / "scans" / f"{name}.nii.gz"),
        "mask": str(folder / "out" / f"{name}.nii.gz"),
        "shape": "x".join(map(str, GRID)),
        "spacing_mm": "x".join([f"{spacing:g}"] * 3),
        "anterior_mm3": float((labels == 1).sum() * voxel),
        "posterior_mm3": float((labels == 2).sum() * voxel),
    }


def _labels(anterior: int, posterior: int) -> np.ndarray:
    """A mask with ``anterior`` voxels of label 1 and ``posterior`` of label 2 (in slabs)."""
    flat = np.zeros(int(np.prod(GRID)), dtype=np.uint8)
    flat[:anterior] = 1
    if posterior:
        flat[-posterior:] = 2
    return flat.reshape(GRID)


@pytest.fixture
def output_folder(tmp_path):
    """An inference output folder of six scans: typical ones, one without a posterior label,
    one with too large an anterior volume, one with 3 mm voxels, one far more uncertain."""
    (tmp_path / "out").mkdir()
    rows = []
    typical = _labels(1800, 1500)
    for k in range(3):
        rows.append(_case(tmp_path, f"typical_{k}", typical) | {"uncertainty": 0.15 + 0.005 * k})
    rows.append(_case(tmp_path, "no_posterior", _labels(1800, 0)) | {"uncertainty": 0.16})
    rows.append(_case(tmp_path, "huge_anterior", _labels(9000, 1500)) | {"uncertainty": 0.155})
    rows.append(_case(tmp_path, "coarse", _labels(60, 60), spacing=3.0) | {"uncertainty": 0.6})
    (tmp_path / "out" / "volumes.json").write_text(json.dumps(rows))
    return tmp_path / "out"


def _flags_by_scan(page: str) -> dict[str, list[str]]:
    rows = re.findall(r'<tr class="\w+"[^>]*>(.*?)</tr>', page, re.S)
    found = {}
    for row in rows:
        name = re.search(r'<td data-value="([^"]+)" title=', row).group(1)
        found[name] = re.findall(r"<li>(.*?)</li>", row)
    return found


def test_flags_name_missing_labels_volumes_voxel_sizes_and_uncertainty(output_folder):
    page = write_report(output_folder, bundle=BUNDLE).read_text()
    flags = _flags_by_scan(page)
    assert list(flags)[:3] == ["coarse.nii.gz", "no_posterior.nii.gz", "huge_anterior.nii.gz"]  # most flags first
    assert flags["no_posterior.nii.gz"] == ["no posterior"]
    assert len(flags["huge_anterior.nii.gz"]) == 1
    assert flags["huge_anterior.nii.gz"][0].startswith("anterior volume 9000 mm3 outside training 1-99 %")
    coarse = flags["coarse.nii.gz"]
    assert any(f.startswith("voxel size 3 x 3 x 3 mm unlike training") for f in coarse)
    assert any(f.startswith("uncertainty 0.600 far above the batch") for f in coarse)
    assert all(not flags[f"typical_{k}.nii.gz"] for k in range(3))
    assert "6 scans, 3 flagged" in page


def test_without_a_bundle_only_labels_and_uncertainty_are_flagged(output_folder):
    flags = _flags_by_scan(write_report(output_folder).read_text())
    assert flags["huge_anterior.nii.gz"] == [] and flags["no_posterior.nii.gz"] == ["no posterior"]
    assert [f.split(" ")[0] for f in flags["coarse.nii.gz"]] == ["uncertainty"]


def test_the_page_is_self_contained_with_one_picture_per_scan(output_folder):
    page = write_report(output_folder, bundle=BUNDLE).read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<(link|script)[^>]+(src|href)=", page)  # nothing fetched from anywhere
    assert "http://" not in page and "https://" not in page


def test_planes_are_drawn_in_the_radiological_view(tmp_path):
    """A blob on the patient's left (RAS voxel i = 0 side) appears on the right of the axial
    and coronal pictures; a blob at the front (high j) at the top of the axial one."""
    labels = np.zeros(GRID, dtype=np.uint8)
    labels[0:4, 10:14, 10:14] = 1  # the patient's left (RAS: x grows to the right)
    labels[12:16, 28:32, 10:14] = 2  # anterior
    (tmp_path / "out").mkdir()
    row = _case(tmp_path, "sides", labels)
    scan, mask = _load_pair(row, tmp_path / "out")
    array = sitk.GetArrayFromImage(mask)  # LPS (z, y, x): RAS j = 12 is LPS y = 33 - 12 = 21
    _, axial, _ = _plane(array, array, (12, 21, 12), np.ones(3), "axial")
    _, coronal, _ = _plane(array, array, (12, 21, 12), np.ones(3), "coronal")
    columns = axial.shape[1]
    assert np.argwhere(axial == 1)[:, 1].min() >= columns - 4  # the patient's left: the picture's right
    assert np.argwhere(coronal == 1)[:, 1].min() >= columns - 4
    assert np.argwhere(axial == 2)[:, 0].max() < 6  # anterior: the top rows


def test_an_existing_report_needs_overwrite_and_a_moved_scan_is_named(output_folder):
    write_report(output_folder)
    with pytest.raises(UserError, match="report.html: already exists"):
        write_report(output_folder)
    rows = json.loads((output_folder / "volumes.json").read_text())
    moved = rows[1]["input"]
    shutil.move(moved, moved + ".bak")
    before = (output_folder / REPORT_NAME).read_bytes()
    with pytest.raises(UserError, match=re.escape(f"{moved}: not found")):
        write_report(output_folder, overwrite=True)
    assert (output_folder / REPORT_NAME).read_bytes() == before  # the old page stays whole
    with pytest.raises(UserError, match="volumes.json: not found; run medfcn infer"):
        write_report(output_folder.parent / "scans")


def test_infer_report_refuses_an_existing_page_before_segmenting(tmp_path, spheres_dataset):
    out = tmp_path / "o"
    out.mkdir()
    (out / REPORT_NAME).write_text("mine")
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    done = subprocess.run(
        [sys.executable, "-m", "medfcn", "infer", str(BUNDLE), str(scan), "--out", str(out), "--report"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 2 and "report.html: already exists" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [REPORT_NAME]


# --- in a real browser ----------------------------------------------------------------------


@pytest.fixture
def browser():
    """Headless Chromium through Selenium, its console kept (skipped where not installed)."""
    webdriver = need_module("selenium.webdriver", "pip install -e '.[dev]'")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        missing = pytest.fail if os.environ.get("MEDFCN_REQUIRE_EXTRAS") == "1" else pytest.skip  # .ci/run: fail
        missing("chromium and chromedriver not installed (apt-get install chromium chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --disable-dev-shm-usage: containers often give /dev/shm 64 MB, where Chromium's renderer can crash
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield chrome
    chrome.quit()


def test_chromium_renders_a_row_and_a_picture_per_scan_and_sorts(output_folder, browser, tmp_path):
    from selenium.webdriver.common.by import By

    path = write_report(output_folder, bundle=BUNDLE)
    browser.get(path.as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#scans tbody tr")
    assert len(rows) == 6
    for row in rows:
        image = row.find_element(By.TAG_NAME, "img")
        natural = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
        assert natural > 0 and image.size["width"] > 300 and image.size["height"] > 50
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []

    def names() -> list[str]:
        return [
            r.find_elements(By.TAG_NAME, "td")[1].text
            for r in browser.find_elements(By.CSS_SELECTOR, "#scans tbody tr")
        ]

    header = browser.find_elements(By.CSS_SELECTOR, "#scans thead th")
    header[1].click()  # scan name, descending first
    assert names() == sorted(names(), reverse=True)
    header[1].click()
    assert names() == sorted(names())
    header[4].click()  # uncertainty, highest first
    assert names()[0] == "coarse.nii.gz"
    assert browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000
