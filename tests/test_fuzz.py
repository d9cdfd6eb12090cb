"""Hypothesis fuzzing of readers and geometry: any shape, dtype and affine gives a mask on the
input's own grid, or a clear UserError, never another exception."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medfcn.errors import UserError
from medfcn.segmenter import load_segmenter

from .conftest import BUNDLE


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


@st.composite
def scans(draw):
    shape = tuple(draw(st.integers(2, 19)) for _ in range(3))  # 1 voxel thick: the "slice" defect
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.float32, np.float64]))
    spacing = [draw(st.floats(0.5, 2.5)) for _ in range(3)]
    perm = draw(st.permutations([0, 1, 2]))
    flips = [draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)]
    oblique = draw(st.booleans())
    angles = [draw(st.floats(-0.6, 0.6)) for _ in range(3)] if oblique else [0.0, 0.0, 0.0]
    matrix = _rotation(angles) @ np.eye(3)[list(perm)] @ np.diag(np.array(flips) * spacing)
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = [draw(st.floats(-200, 200)) for _ in range(3)]
    seed = draw(st.integers(0, 2**16))
    data = (np.random.default_rng(seed).random(shape) * 100).astype(dtype)
    return data, affine


@pytest.fixture(scope="module")
def run_infer():
    """``medfcn.infer.infer`` (masks written to disk) with the bundle loaded once."""
    import medfcn.infer

    segmenter = load_segmenter(BUNDLE, device="cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(medfcn.infer, "load_segmenter", lambda *args, **kwargs: segmenter)
        yield medfcn.infer.infer


def _with_defect(data: np.ndarray, defect: str | None) -> np.ndarray:
    """The scan, or a broken copy: a NaN voxel, a second channel, an empty or a one-voxel first axis."""
    if defect == "nan":
        data = data.astype(np.float32)
        data.flat[data.size // 2] = np.nan
    elif defect == "channels":
        data = np.stack([data, data], axis=-1)
    elif defect == "empty":
        data = data[:0]
    elif defect == "slice":
        data = data[:1]
    return data


@pytest.mark.filterwarnings("ignore::medfcn.errors.InputWarning")  # a 2x2x2 uint8 scan "looks like labels"
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scan=scans(), defect=st.sampled_from([None, None, None, "nan", "channels", "empty", "slice"]))
def test_mask_geometry_equals_input(run_infer, tmp_path_factory, scan, defect):
    """A valid scan gives a uint8 mask file on exactly its grid; a broken one a UserError and no file."""
    data, affine = scan
    data = _with_defect(data, defect)
    folder = tmp_path_factory.mktemp("fuzz")
    path, out = folder / "scan.nii.gz", folder / "out"
    nib.save(nib.Nifti1Image(data, affine), path)
    if defect is not None:
        with pytest.raises(UserError, match="scan.nii.gz"):
            run_infer(BUNDLE, [path], out)
        assert not out.exists() or not any(out.iterdir())
        return
    run_infer(BUNDLE, [path], out)
    stored = nib.load(path)  # the affine as the file holds it (float32 in the header)
    mask = nib.load(out / "scan.nii.gz")
    labels = np.asarray(mask.dataobj)
    assert labels.shape == data.shape
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    np.testing.assert_allclose(mask.affine, stored.affine, atol=1e-4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scan=scans())
def test_simpleitk_reader_geometry(tmp_path_factory, scan):
    """SimpleITKReader on .mha files of any shape/dtype/direction: voxels and affine agree with
    SimpleITK's own index-to-world mapping (LPS -> RAS)."""
    import SimpleITK as sitk
    from monai.transforms import LoadImage

    from medfcn.data.readers import SimpleITKReader

    data, affine = scan
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    image = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)))
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    path = tmp_path_factory.mktemp("mha") / "scan.mha"
    sitk.WriteImage(image, str(path))
    loaded = LoadImage(reader=SimpleITKReader(), image_only=True)(path)
    np.testing.assert_array_equal(np.asarray(loaded), data.astype(np.asarray(loaded).dtype))
    ijk = np.array(data.shape) - 1
    world = np.array(sitk.ReadImage(str(path)).TransformIndexToPhysicalPoint(ijk.tolist())) * [-1, -1, 1]
    np.testing.assert_allclose((np.asarray(loaded.affine) @ np.append(ijk, 1))[:3], world, atol=1e-4)
