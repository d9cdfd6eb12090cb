"""Ensembles of bundles (medfcn infer --models; medfcn.segmenter.Ensemble): the mask is the
argmax of the members' mean class probabilities on the scan's grid, the uncertainty map the
entropy of that mean."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medfcn.errors import UserError
from medfcn.infer import Extras, _model_name, infer
from medfcn.segmenter import Prediction, _check_same_grid, bundle_names, load_ensemble
from medfcn.uncertainty import normalised_entropy, uncertainty_score

from .conftest import BUNDLE, BUNDLE_2D, REPO, medfcn

ALL_MAPS = Extras(uncertainty=True, probabilities=True)


def _maps(folder, case):
    """``(mask, uncertainty, probabilities (X, Y, Z, K))`` written for ``case`` into ``folder``."""
    return tuple(
        np.asarray(nib.load(folder / f"{case}{suffix}.nii.gz").dataobj)
        for suffix in ("", "_uncertainty", "_probabilities")
    )


def test_the_mask_and_maps_come_from_the_mean_of_the_members_probabilities(tmp_path, spheres_dataset):
    scan = spheres_dataset / "imagesTr" / "case_001.nii.gz"
    said = []
    rows = infer(BUNDLE, [scan], tmp_path / "ens", tta=True, extras=ALL_MAPS, models=[BUNDLE_2D], progress=said.append)
    # each member alone, as the ensemble runs it: the 3D bundle flipped, the 2D one (trained without flips) not
    infer(BUNDLE, [scan], tmp_path / "3d", tta=True, extras=ALL_MAPS)
    infer(BUNDLE_2D, [scan], tmp_path / "2d", extras=ALL_MAPS)
    mask, entropy, probabilities = _maps(tmp_path / "ens", "case_001")
    expected = (_maps(tmp_path / "3d", "case_001")[2] + _maps(tmp_path / "2d", "case_001")[2]) / 2
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert not np.allclose(expected, _maps(tmp_path / "3d", "case_001")[2], atol=1e-2)  # the 2D member counts
    ranked = np.sort(expected, -1)
    clear = ranked[..., -1] - ranked[..., -2] > 1e-3
    np.testing.assert_array_equal(mask[clear], expected.argmax(-1)[clear])
    np.testing.assert_allclose(
        entropy, normalised_entropy(torch.from_numpy(np.moveaxis(probabilities, -1, 0))).numpy(), atol=1e-5
    )
    assert rows[0]["uncertainty"] == pytest.approx(uncertainty_score(entropy, mask), abs=1e-5)
    assert rows[0]["anterior_mm3"] == float((mask == 1).sum())  # the spheres' voxels are 1 mm
    assert any("hippocampus_fcn_2d was trained without flips" in line for line in said)
    assert not any("hippocampus_fcn was trained" in line for line in said)  # the 3D member is flipped


def test_the_mask_is_written_as_the_first_bundles_mask_is(tmp_path, spheres_dataset):
    scan = spheres_dataset / "imagesTr" / "case_002.nii.gz"
    infer(BUNDLE, [scan], tmp_path / "alone")
    infer(BUNDLE, [scan], tmp_path / "ensemble", models=[BUNDLE_2D])
    alone = nib.load(tmp_path / "alone" / "case_002.nii.gz")
    ensemble = nib.load(tmp_path / "ensemble" / "case_002.nii.gz")
    assert ensemble.get_data_dtype() == np.uint8
    assert ensemble.header.binaryblock == alone.header.binaryblock  # the scan's geometry, field by field
    labels = np.asarray(ensemble.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels > 0).any()


def test_a_warning_about_the_scan_is_listed_once_not_once_per_member(tmp_path, spheres_dataset):
    label_map = spheres_dataset / "labelsTr" / "case_000.nii.gz"  # what a scan passed by mistake looks like
    with pytest.warns(UserWarning, match="looks like a label map"):
        rows = infer(BUNDLE, [label_map], tmp_path / "out", models=[BUNDLE_2D])
    assert rows[0]["warnings"].count("looks like a label map") == 1


def _renamed_copy(bundle, folder, edit=None):
    """A copy of ``bundle`` in ``folder``; ``edit(common_config)`` changes its common.json."""
    shutil.copytree(bundle, folder, ignore=shutil.ignore_patterns("*.onnx", "*.pt2", "*.ts"))
    if edit:
        path = folder / "configs" / "common.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return folder


def test_bundles_with_other_class_names_are_refused_before_anything_is_written(tmp_path, spheres_dataset):
    other = _renamed_copy(BUNDLE_2D, tmp_path / "swapped", lambda c: c.update(class_names=c["class_names"][::-1]))
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    with pytest.raises(UserError, match=r"swapped: its class_names \['posterior', 'anterior'\] are not"):
        infer(BUNDLE, [scan], tmp_path / "out", models=[other])
    assert not (tmp_path / "out").exists()


def test_a_bundle_given_twice_is_refused(tmp_path):
    with pytest.raises(UserError, match="given twice for one ensemble"):
        load_ensemble([BUNDLE, BUNDLE_2D, REPO / "bundles" / ".." / "bundles" / "hippocampus_fcn"])


def test_tta_needs_at_least_one_member_trained_with_flips(tmp_path):
    other = _renamed_copy(BUNDLE_2D, tmp_path / "second_2d")
    with pytest.raises(UserError, match="--tta: none of hippocampus_fcn_2d, second_2d was trained with flips"):
        load_ensemble([BUNDLE_2D, other], tta=True)
    assert [m.flip_axes for m in load_ensemble([BUNDLE, other], tta=True).members] == [[0], []]


def test_predictions_on_different_grids_are_refused():
    def prediction(shape, shift=0.0):
        affine = np.eye(4)
        affine[0, 3] = shift
        return Prediction(np.zeros(shape, np.uint8), affine, 0.0, torch.zeros((3, *shape)))

    _check_same_grid("scan.nii.gz", ("a", prediction((4, 5, 6))), ("b", prediction((4, 5, 6), 1e-6)))
    differences = {"shapes .4, 5, 6. and .4, 5, 7. voxels": (4, 5, 7), "affines up to 0.5 mm apart": (4, 5, 6)}
    for differs, shape in differences.items():
        other = prediction(shape, 0.5 if shape == (4, 5, 6) else 0.0)
        message = f"scan.nii.gz: a and b give predictions on different voxel grids .{differs}"
        with pytest.raises(UserError, match=message):
            _check_same_grid("scan.nii.gz", ("a", prediction((4, 5, 6))), ("b", other))


def test_a_dicom_seg_names_every_member_of_the_ensemble(tmp_path):
    versions = [json.loads((b / "configs" / "metadata.json").read_text())["version"] for b in (BUNDLE, BUNDLE_2D)]
    assert _model_name([BUNDLE, BUNDLE_2D]) == ("hippocampus_fcn+hippocampus_fcn_2d", "+".join(versions))
    assert _model_name([BUNDLE]) == ("hippocampus_fcn", versions[0])
    unversioned = [tmp_path / "a", tmp_path / "b"]  # no metadata.json
    assert _model_name([BUNDLE, unversioned[0]]) == ("hippocampus_fcn+a", f"{versions[0]}+?")
    assert _model_name(unversioned) == ("a+b", "")  # empty: the DICOM SEG then states medfcn's version


def test_members_of_the_same_name_are_told_apart_by_their_folder(tmp_path):
    folds = [tmp_path / "fold0" / "spleen", tmp_path / "fold1" / "spleen"]
    assert bundle_names([*folds, BUNDLE]) == ["fold0/spleen", "fold1/spleen", "hippocampus_fcn"]


def test_cli_models_option(tmp_path, spheres_dataset):
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    command = ["infer", BUNDLE, scan, "--models", BUNDLE_2D]
    done = medfcn(*command, "--out", tmp_path / "o", "--tta", "--uncertainty")
    assert done.returncode == 0, done.stderr
    assert "hippocampus_fcn_2d was trained without flips" in done.stdout
    assert {p.name for p in (tmp_path / "o").iterdir()} == {
        "case_000.nii.gz",
        "case_000_uncertainty.nii.gz",
        "volumes.csv",
        "volumes.json",
    }
    refused = medfcn(*command, "--models", BUNDLE_2D, "--out", tmp_path / "p")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one line, no traceback
    assert "given twice for one ensemble" in refused.stderr
    assert not (tmp_path / "p").exists()
