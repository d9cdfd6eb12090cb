"""What importing medfcn sets up: the warnings it silences, each alone."""

from __future__ import annotations

import os
import subprocess
import sys

# MONAI's trainer with AMP on makes its gradient scaler through torch.cuda.amp (deprecated): the
# real call, on the CPU (Workflow.run stubbed: nothing is trained), then the same category from
# the same module with another message, and the same message from another module.
SCRIPT = """
import warnings
import torch
import medfcn
from monai.engines import SupervisedTrainer
from monai.engines.workflow import Workflow

Workflow.run = lambda self: None
net = torch.nn.Conv3d(1, 2, 1)
trainer = SupervisedTrainer(
    device=torch.device("cpu"), max_epochs=1, train_data_loader=[{}], network=net,
    optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(), amp=True,
)
trainer.run()
msg = "`torch.cuda.amp.GradScaler(args...)` is deprecated. Please use `torch.amp.GradScaler('cuda', args...)` instead."
warnings.warn_explicit("another deprecation", FutureWarning, "trainer.py", 60, module="monai.engines.trainer")
warnings.warn_explicit(msg, FutureWarning, "mine.py", 1, module="mine")
"""


def test_only_monai_trainers_gradscaler_notice_is_silenced():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if "FutureWarning" in line]
    assert len(shown) == 2 and "trainer.py:60" in shown[0] and "mine.py:1" in shown[1], result.stderr
