"""What importing medfcn sets up: the warnings it silences, each alone."""

from __future__ import annotations

import subprocess
import sys

# As MONAI's trainer raises it on CUDA (monai/engines/trainer.py, torch 2.4+), then the same
# category from the same module with another message, and the same message from elsewhere.
SCRIPT = """
import warnings
import medfcn
msg = "`torch.cuda.amp.GradScaler(args...)` is deprecated. Please use `torch.amp.GradScaler('cuda', args...)` instead."
warnings.warn_explicit(msg, FutureWarning, "trainer.py", 54, module="monai.engines.trainer")
warnings.warn_explicit("another deprecation", FutureWarning, "trainer.py", 60, module="monai.engines.trainer")
warnings.warn_explicit(msg, FutureWarning, "mine.py", 1, module="mine")
"""


def test_only_monai_trainers_gradscaler_notice_is_silenced():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if "FutureWarning" in line]
    assert len(shown) == 2 and "trainer.py:60" in shown[0] and "mine.py:1" in shown[1], result.stderr
