"""Training: a bundle's ``configs/train.json`` run in three stages.

- :mod:`~medfcn.training.settings`: the options and the resume policy, applied to the run's
  one config parser and checked; the run record (``medfcn_run.json``).
- :mod:`~medfcn.training.labels`: the classes and modality of the dataset's ``dataset.json``
  where they differ from the bundle's (unless set).
- :mod:`~medfcn.training.preflight`: data, split, classes, the network (built once), a dry
  run, the checkpoint a resume continues (read once), a pretrained encoder.
- :mod:`~medfcn.training.split`: the split made in the run folder where the bundle's does not
  fit the dataset.
- :mod:`~medfcn.training.run`: :func:`train`, the entry point; the lock on the output folder,
  the config's expressions, the training-data profile, the clean-up of a failed run.

:mod:`~medfcn.training.handlers` (resume, reseeding, EMA, checkpoints) and
:mod:`~medfcn.training.monitoring` (progress, TensorBoard) are the handlers ``train.json``
uses; :func:`best_validation` reads what a finished run reached.

Example::

    from medfcn.training import train
    out = train("bundles/hippocampus_fcn", fold=0, epochs=5, output_dir="runs/try")
"""

from medfcn.training.result import BestValidation, best_validation
from medfcn.training.run import train

__all__ = ["BestValidation", "best_validation", "train"]
