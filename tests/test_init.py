"""What importing medfcn sets up (nothing: no warning filter, no log setting, no torch), and the
library notices :func:`medfcn.notices.quiet_library_notices` silences, each alone, only inside
its block."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import REPO

# MONAI's trainer with AMP on makes its gradient scaler through torch.cuda.amp (deprecated): the
# real call, on the CPU (Workflow.run stubbed: nothing is trained), then the same category from
# the same module with another message, and the same message from another module; after the
# block, the scaler's notice shows again.
SCRIPT = """
import warnings
import torch
from medfcn.notices import quiet_library_notices
from monai.engines import SupervisedTrainer
from monai.engines.workflow import Workflow

Workflow.run = lambda self: None
net = torch.nn.Conv3d(1, 2, 1)


def make_trainer():
    return SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[{}], network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(), amp=True,
    )


msg = "`torch.cuda.amp.GradScaler(args...)` is deprecated. Please use `torch.amp.GradScaler('cuda', args...)` instead."
with quiet_library_notices():
    make_trainer().run()
    warnings.warn_explicit("another deprecation", FutureWarning, "trainer.py", 60, module="monai.engines.trainer")
    warnings.warn_explicit(msg, FutureWarning, "mine.py", 1, module="mine")
print("after the block", file=sys.stderr)
make_trainer().run()
"""


def _python(script: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-c", "import sys\n" + script], capture_output=True, text=True, env=env, timeout=120
    )


def test_only_monai_trainers_gradscaler_notice_is_silenced():
    result = _python(SCRIPT)
    assert result.returncode == 0, result.stderr
    inside, after = result.stderr.split("after the block")
    shown = [line for line in inside.splitlines() if "FutureWarning" in line]
    assert len(shown) == 2 and "trainer.py:60" in shown[0] and "mine.py:1" in shown[1], result.stderr
    assert "FutureWarning: `torch.cuda.amp.GradScaler" in after, result.stderr


def test_import_medfcn_installs_nothing_and_loads_no_torch():
    """A program importing medfcn keeps its own warning filters and loggers; bundle configs'
    ``medfcn.FCN`` still resolves, loading torch only then."""
    script = """
import logging, warnings
filters = list(warnings.filters)
loggers = {name: (logging.getLogger(name).level, list(logging.getLogger(name).filters))
           for name in ("monai.data.nvimgcodec_pydicom_plugin", "nibabel.global")}
import medfcn
assert warnings.filters == filters, "import medfcn changed the warning filters"
assert {name: (logging.getLogger(name).level, list(logging.getLogger(name).filters)) for name in loggers} == loggers
heavy = [m for m in ("torch", "monai", "nibabel", "numpy", "SimpleITK") if m in sys.modules]
assert not heavy, heavy
from monai.bundle import ConfigParser
net = ConfigParser({"net": {"_target_": "medfcn.FCN", "spatial_dims": 2, "in_channels": 1, "out_channels": 2}})
assert type(net.get_parsed_content("net")).__name__ == "FCN" and medfcn.FCN.__module__ == "medfcn.networks.fcn"
assert "FCN" in dir(medfcn)
"""
    result = _python(script)
    assert result.returncode == 0, result.stderr


def test_library_notices_are_dropped_inside_the_block_only():
    script = """
import logging, warnings
from medfcn.notices import quiet_library_notices
logging.basicConfig(format="%(name)s: %(message)s")
nv, nib = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin"), logging.getLogger("nibabel.global")
def notices(tag):
    nv.warning(f"{tag}: nvImageCodec is not available; skipping pydicom decoder plugin registration.")
    nv.warning(f"{tag}: another plugin message")
    nib.warning(f"{tag}: pixdim[1,2,3] should be positive; setting to abs")
    warnings.warn(f"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register ({tag})")
with quiet_library_notices():
    notices("inside")
notices("after")
"""
    result = _python(script)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if "inside" in line] == [
        "monai.data.nvimgcodec_pydicom_plugin: inside: another plugin message"
    ], result.stderr
    assert len([line for line in lines if "after" in line]) == 4, result.stderr


def test_a_config_expression_reaches_medfcn_networks_after_import_medfcn_alone():
    """train.json's ``$medfcn.networks.transfer_encoder(...)`` runs with ``$import medfcn`` only:
    the light ``import medfcn`` must still make ``medfcn.networks`` reachable (a fresh process,
    since another test may have imported it already)."""
    code = "import medfcn, sys; assert 'torch' not in sys.modules; print(medfcn.networks.transfer_encoder.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "transfer_encoder", done.stderr
