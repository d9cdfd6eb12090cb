"""medfcn.inferers: autocast keeps float32 outputs; flip TTA averages flipped predictions."""

from __future__ import annotations

import torch
from monai.inferers import SimpleInferer

from medfcn.inferers import Autocast, FlipTTA, use_cpu_bf16


def test_autocast_returns_float32_close_to_fp32():
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 8, 8, 8)
    out = Autocast(SimpleInferer(), enabled=True)(x, net)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, net(x), atol=0.05, rtol=0.05)
    torch.testing.assert_close(Autocast(SimpleInferer(), enabled=False)(x, net), net(x))


def test_use_cpu_bf16_only_on_cpu():
    assert not use_cpu_bf16("cuda")
    assert not use_cpu_bf16("cpu", requested=False)


def test_flip_tta_averages_over_flips():
    def net(x):  # depends on position along axis 0: flipping changes the raw output
        ramp = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
        return x + ramp

    x = torch.randn(1, 1, 5, 4, 3)
    out = FlipTTA(SimpleInferer(), spatial_axes=[0])(x, net)
    expected = (net(x) + torch.flip(net(torch.flip(x, [2])), [2])) / 2
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(FlipTTA(SimpleInferer(), [])(x, net), net(x))
