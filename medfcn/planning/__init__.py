"""The plan stage: configure a bundle from a dataset and the time the user has on this machine.

``medfcn plan DATASET --out BUNDLE --budget-minutes 60`` runs, in order:

1. :func:`medfcn.planning.fingerprint.fingerprint_dataset`: read every case of an MSD dataset
   once (``dataset.json``, ``imagesTr``, ``labelsTr``; several modalities as the 4th image
   axis) and describe it: per case shape, spacing and orientation; per channel intensity
   statistics inside the foreground; per label voxel counts and volumes (mm^3). Bad datasets
   fail there, in one line, before any work (:class:`medfcn.errors.UserError`).
2. :func:`medfcn.planning.rules.make_plan`: decide target spacing, normalisation, 2D or 3D,
   patch size, network (width, depth, pooling per axis), augmentation, and, from a short timed
   probe of training steps on this machine (:mod:`medfcn.planning.probe`), the batch size and
   the number of epochs that fit the budget (at most ``rules.MAX_EPOCHS``). Each decision carries
   the reason it was taken.
3. :func:`medfcn.planning.writer.write_bundle`: a complete MONAI bundle (``configs/common.json``
   with the plan, the stage configs every bundle shares from ``template/``,
   ``configs/fingerprint.json``, ``configs/metadata.json``, ``docs/README.md`` with the
   reasons, ``LICENSE``) that ``medfcn train/infer/evaluate/package`` and
   ``python -m monai.bundle run`` take as they take the shipped bundles.

The fingerprint (``configs/fingerprint.json``) is plain JSON::

    {
      "medfcn_fingerprint": 1,
      "dataset": {"name": str, "dir": str (absolute), "modality": {"0": "MRI", ...},
                  "labels": {"0": "background", "1": "left atrium", ...}, "num_cases": int},
      "cases": [                               # sorted by case id; axes in RAS order (after
        {"case": str,                          # reorientation to the closest RAS, as the
         "shape": [x, y, z],                   # bundles' Orientationd does)
         "spacing_mm": [sx, sy, sz],
         "orientation": "LPS",                 # the file's axis codes
         "channels": int,
         "voxel_volume_mm3": f,
         "label_voxels": {"1": int, ...},      # every label of dataset.json, 0 if absent
         "label_volume_mm3": {"1": f, ...},    # label_voxels x voxel_volume_mm3
         "label_centroids_vox": {"1": [x, y, z] or null, ...}},   # RAS voxel index
        ...],
      "intensity": {"0": {"name": "MRI", "mean": f, "std": f, "min": f, "max": f,
                          "percentile_00_5": f, "percentile_50_0": f, "percentile_99_5": f,
                          "foreground_voxels_sampled": int}, ...},   # per channel, in the
                                                                      # foreground (label > 0)
      "labels": {"1": {"name": str, "cases_present": int,         # over the cases holding it;
                       "voxels": {"min": f, "median": f, "max": f},   # null each when none does
                       "volume_mm3": {"min": f, "median": f, "max": f}}, ...},
      "summary": {"median_shape": [x, y, z] (floats: a median of an even count may end in .5),
                  "min_shape": [x, y, z], "max_shape": [x, y, z],
                  "median_spacing_mm": [sx, sy, sz],
                  "min_spacing_mm": [..], "max_spacing_mm": [..], "channels": int}
    }

Intensities are sampled (at most 10,000 foreground voxels per case, seeded: deterministic), so
``min``/``max`` are those of the sample.
"""

from __future__ import annotations

__all__ = ["Plan", "fingerprint_dataset", "make_plan", "plan_bundle", "write_bundle"]


def __getattr__(name: str):
    # lazy: `import medfcn.planning` stays cheap, and `medfcn --help` imports no torch
    if name == "fingerprint_dataset":
        from medfcn.planning.fingerprint import fingerprint_dataset

        return fingerprint_dataset
    if name in ("Plan", "make_plan"):
        from medfcn.planning import rules

        return getattr(rules, name)
    if name == "write_bundle":
        from medfcn.planning.writer import write_bundle

        return write_bundle
    if name == "plan_bundle":
        from medfcn.planning.run import plan_bundle

        return plan_bundle
    raise AttributeError(name)
