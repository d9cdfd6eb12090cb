"""Uncertainty maps and scores, class probabilities, and the largest-component cleanup
(medfcn.uncertainty, medfcn infer --uncertainty / --probabilities / --largest-component)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from medfcn.errors import UserError
from medfcn.infer import Extras, infer
from medfcn.inferers import FlipTTA
from medfcn.uncertainty import boundary_band, keep_largest_components, normalised_entropy, uncertainty_score

from .conftest import BUNDLE, DICOM, medfcn, need

ALL_MAPS = Extras(uncertainty=True, probabilities=True)


def test_entropy_is_0_where_certain_1_where_uniform_and_ordered_between():
    p = torch.tensor([[1.0, 1 / 3, 0.5, 0.8], [0.0, 1 / 3, 0.5, 0.1], [0.0, 1 / 3, 0.0, 0.1]])
    entropy = normalised_entropy(p)
    assert entropy.dtype == torch.float32 and entropy.shape == (4,)
    np.testing.assert_allclose(entropy[:2].numpy(), [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(entropy[2].item(), np.log(2) / np.log(3), rtol=1e-5)
    assert 0 < entropy[3] < entropy[2]


def test_boundary_band_holds_both_sides_of_every_boundary_and_nothing_else():
    labels = np.zeros((20, 3, 3), dtype=np.uint8)
    labels[5:10], labels[10:15] = 1, 2  # background | 1 | 2 | background along x
    band = boundary_band(labels, width=2)
    rows = np.flatnonzero(band[:, 1, 1])
    assert rows.tolist() == [3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16]
    assert band.all(axis=(1, 2)).tolist() == band[:, 1, 1].tolist()  # the same in every column
    assert not boundary_band(np.ones((5, 5, 5), dtype=np.uint8)).any()


def test_score_is_the_entropy_in_the_band_per_foreground_voxel_and_none_without_foreground():
    labels = np.zeros((24, 4, 4), dtype=np.uint8)
    labels[8:12] = 1  # 64 foreground voxels; its band: x 6..13, 128 voxels
    band = boundary_band(labels)
    assert band.sum() == 128
    entropy = np.where(band, 0.4, 0).astype(np.float32)
    entropy[0] = 1.0  # far from the mask: not counted
    assert uncertainty_score(entropy, labels) == pytest.approx(128 * 0.4 / 64)
    longer = np.zeros_like(labels)
    longer[8:16] = 1  # twice the voxels, the same doubt at its two ends: half the score
    assert uncertainty_score(np.where(boundary_band(longer), 0.4, 0), longer) == pytest.approx(0.4)
    assert uncertainty_score(np.zeros_like(entropy), labels) == 0
    assert uncertainty_score(entropy, np.zeros_like(labels)) is None


def test_largest_component_per_label_with_corner_contact_as_connected():
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[0:3, 0:3, 0:3] = 1  # 27 voxels
    labels[3, 3, 3] = 1  # touches the cube at a corner only: part of it (26-connectivity)
    labels[8:10, 8:10, 8:10] = 1  # 8 voxels, apart: removed
    labels[6:8, 0:2, 0:2] = 2  # label 2's largest, kept ...
    labels[0, 10, 10] = 2  # ... and its stray voxel removed
    kept = keep_largest_components(labels)
    assert (kept == 1).sum() == 28 and kept[3, 3, 3] == 1 and not kept[8:10, 8:10, 8:10].any()
    assert (kept == 2).sum() == 8 and kept[0, 10, 10] == 0
    assert labels[8, 8, 8] == 1  # the input is left as it was


def test_probability_average_over_flips_gives_the_mean_softmax_back_through_softmax():
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 3, 3, padding=1)
    x = torch.randn(1, 1, 6, 5, 4)

    class Direct:
        def __call__(self, inputs, net):
            return net(inputs)

    with torch.no_grad():
        averaged = FlipTTA(Direct(), spatial_axes=[0], average="probabilities")(x, network)
        one = torch.softmax(network(x), 1)
        flipped = torch.flip(torch.softmax(network(torch.flip(x, [2])), 1), [2])
        logits = FlipTTA(Direct(), spatial_axes=[0])(x, network)
    torch.testing.assert_close(torch.softmax(averaged, 1), (one + flipped) / 2, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(torch.softmax(logits, 1), (one + flipped) / 2, atol=1e-6)  # a different average
    with pytest.raises(ValueError, match="average"):
        FlipTTA(Direct(), average="median")


def _non_ras_scan(spheres_dataset, folder):
    """A synthetic scan stored with flipped, permuted axes and a qform that differs from its sform."""
    image = nib.load(spheres_dataset / "imagesTr" / "case_000.nii.gz")
    moved = image.as_reoriented(np.array([[1, -1], [0, 1], [2, 1]]))
    moved.set_qform(moved.affine, code=1)
    sform = moved.affine.copy()
    sform[:3, 3] += 0.25  # a different sform (code 2): both must be copied as they are
    moved.set_sform(sform, code=2)
    folder.mkdir()
    nib.save(moved, folder / "moved.nii.gz")
    return folder / "moved.nii.gz"


def test_maps_have_the_masks_grid_and_header_and_agree_with_it(tmp_path, spheres_dataset):
    scan = _non_ras_scan(spheres_dataset, tmp_path / "in")
    rows = infer(BUNDLE, [scan], tmp_path / "out", extras=ALL_MAPS)
    mask = nib.load(tmp_path / "out" / "moved.nii.gz")
    source = nib.load(scan)
    labels = np.asarray(mask.dataobj)
    for name in ("moved_uncertainty.nii.gz", "moved_probabilities.nii.gz"):
        written = nib.load(tmp_path / "out" / name)
        assert written.get_data_dtype() == np.float32
        assert written.shape[:3] == mask.shape
        # the scan's own header geometry, field by field, as the mask carries it
        for field in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "srow_x"):
            np.testing.assert_array_equal(written.header[field], source.header[field])
        np.testing.assert_array_equal(written.header["pixdim"][:4], source.header["pixdim"][:4])
    entropy = np.asarray(nib.load(tmp_path / "out" / "moved_uncertainty.nii.gz").dataobj)
    probabilities = np.asarray(nib.load(tmp_path / "out" / "moved_probabilities.nii.gz").dataobj)
    assert probabilities.shape == (*mask.shape, 3)  # background + the bundle's 2 classes, channel last
    np.testing.assert_allclose(probabilities.sum(-1), 1, atol=1e-4)
    clear = np.sort(probabilities, -1)[..., -1] - np.sort(probabilities, -1)[..., -2] > 1e-3
    np.testing.assert_array_equal(probabilities.argmax(-1)[clear], labels[clear])  # the mask is their argmax
    assert 0 <= entropy.min() and entropy.max() <= 1 and entropy.max() > 0.1
    expected = normalised_entropy(torch.from_numpy(np.moveaxis(probabilities, -1, 0))).numpy()
    np.testing.assert_allclose(entropy, expected, atol=1e-5)
    assert rows[0]["uncertainty"] == pytest.approx(uncertainty_score(entropy, labels), abs=1e-5)
    table = (tmp_path / "out" / "volumes.csv").read_text().splitlines()
    assert table[0].endswith(",uncertainty,warnings")
    assert json.loads((tmp_path / "out" / "volumes.json").read_text())[0]["uncertainty"] == rows[0]["uncertainty"]


def test_no_map_and_no_score_column_unless_asked(tmp_path, spheres_dataset):
    rows = infer(BUNDLE, [spheres_dataset / "imagesTr" / "case_000.nii.gz"], tmp_path / "out")
    assert "uncertainty" not in rows[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_000.nii.gz", "volumes.csv", "volumes.json"]


def test_dicom_series_maps_open_where_the_series_does(tmp_path):
    folder = need(DICOM) / "PGBM-002_HippoCrop"
    rows = infer(BUNDLE, [folder], tmp_path, tta=True, extras=Extras(uncertainty=True))
    reference = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    written = sitk.ReadImage(str(tmp_path / "PGBM-002_HippoCrop_uncertainty.nii.gz"))
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
    assert 0 < rows[0]["uncertainty"] < 1


def test_a_map_name_taken_by_another_scans_mask_is_refused_before_writing(tmp_path, spheres_dataset):
    (tmp_path / "in").mkdir()
    for name in ("a.nii.gz", "a_uncertainty.nii.gz"):
        shutil.copy(spheres_dataset / "imagesTr" / "case_000.nii.gz", tmp_path / "in" / name)
    with pytest.raises(UserError, match="both would write a_uncertainty.nii.gz"):
        infer(BUNDLE, [tmp_path / "in"], tmp_path / "out", extras=Extras(uncertainty=True))
    assert not (tmp_path / "out").exists()
    infer(BUNDLE, [tmp_path / "in"], tmp_path / "out", extras=Extras(probabilities=True))  # no clash


def test_an_existing_map_needs_overwrite_and_is_kept_otherwise(tmp_path, spheres_dataset):
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    out = tmp_path / "out"
    out.mkdir()
    (out / "case_000_probabilities.nii.gz").write_bytes(b"mine")
    with pytest.raises(UserError, match="case_000_probabilities.nii.gz: already exists"):
        infer(BUNDLE, [scan], out, extras=ALL_MAPS)
    assert (out / "case_000_probabilities.nii.gz").read_bytes() == b"mine"
    assert not (out / "case_000.nii.gz").exists()
    infer(BUNDLE, [scan], out, extras=ALL_MAPS, overwrite=True)
    assert nib.load(out / "case_000_probabilities.nii.gz").shape[-1] == 3


def test_largest_component_leaves_one_component_per_label_and_counts_it(tmp_path, spheres_dataset):
    scan = spheres_dataset / "imagesTr" / "case_001.nii.gz"
    plain = infer(BUNDLE, [scan], tmp_path / "plain")
    kept = infer(BUNDLE, [scan], tmp_path / "kept", extras=Extras(largest_component=True))
    before = np.asarray(nib.load(tmp_path / "plain" / "case_001.nii.gz").dataobj)
    after = np.asarray(nib.load(tmp_path / "kept" / "case_001.nii.gz").dataobj)
    structure = ndimage.generate_binary_structure(3, 3)
    assert max(ndimage.label(before == k, structure)[1] for k in (1, 2)) > 1  # the spheres: several per label
    assert all(ndimage.label(after == k, structure)[1] == 1 for k in (1, 2))
    np.testing.assert_array_equal(after, keep_largest_components(before))
    assert kept[0]["anterior_mm3"] == (after == 1).sum() < plain[0]["anterior_mm3"]


def test_cli_writes_both_maps_and_the_score(tmp_path, spheres_dataset):
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    maps = ("--tta", "--uncertainty", "--probabilities", "--largest-component")
    done = medfcn("infer", BUNDLE, scan, "--out", tmp_path / "o", *maps)
    assert done.returncode == 0, done.stderr
    assert "uncertainty 0." in done.stdout
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {
        "case_000_uncertainty.nii.gz",
        "case_000_probabilities.nii.gz",
    }


def test_a_bundle_without_softmax_is_refused_before_any_scan(tmp_path, spheres_dataset):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    steps = config["postprocessing"]["transforms"]
    config["postprocessing"]["transforms"] = [s for s in steps if s.get("_target_") != "Activationsd"]
    config_file.write_text(json.dumps(config))
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    with pytest.raises(UserError, match=r"inference.json: its postprocessing does not apply a softmax"):
        infer(bundle, [scan], tmp_path / "out", extras=Extras(uncertainty=True))
    assert not (tmp_path / "out").exists()
    infer(bundle, [scan], tmp_path / "out")  # the mask alone needs no probabilities
