"""medfcn.networks.fcn: shapes over 2D/3D and odd sizes, fusion, freezing, loading, TorchScript."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medfcn import FCN
from medfcn.networks.fcn import ResidualBlock

# (spatial_dims, in, out, features, fusion, input spatial shape)
CASES = [
    (3, 1, 3, (8, 16, 32, 64), "sum", (35, 51, 32)),
    (3, 2, 2, (8, 16, 32), "concat", (35, 51, 32)),
    (3, 1, 3, (4, 8), "sum", (17, 9, 5)),
    (2, 1, 3, (8, 16, 32, 64), "sum", (37, 45)),
    (2, 3, 2, (8, 16, 32), "concat", (37, 45)),
    (2, 1, 4, (4, 8, 16), "sum", (64, 64)),
]


@pytest.mark.parametrize("dims, cin, cout, features, fusion, shape", CASES)
def test_output_shape_equals_input_shape(dims, cin, cout, features, fusion, shape):
    net = FCN(dims, cin, cout, features=features, fusion=fusion)
    out = net(torch.randn(2, cin, *shape))
    assert out.shape == (2, cout, *shape)


def test_one_voxel_thick_input_with_batch_norm():
    net = FCN(3, 1, 2, features=(4, 8, 16), norm="batch").eval()
    assert net(torch.randn(1, 1, 1, 5, 7)).shape == (1, 2, 1, 5, 7)


def test_no_fully_connected_layer_and_transposed_conv_decoder():
    net = FCN(3, 1, 3, features=(8, 16, 32))
    kinds = {type(m) for m in net.modules()}
    assert nn.Linear not in kinds
    assert nn.ConvTranspose3d in kinds
    assert nn.MaxPool3d in kinds


def test_sum_fusion_adds_projected_skip():
    """y = up(x) + proj(skip): zeroing the projection must leave exactly the upsampled path."""
    net = FCN(2, 1, 2, features=(4, 8)).eval()
    step = net.decoder.steps[0]
    x, skip = torch.randn(1, 8, 5, 6), torch.randn(1, 4, 10, 11)
    up = step.up(x)[..., :10, :11]
    expected = step.refine(up + step.proj(skip))
    torch.testing.assert_close(step(x, skip), expected)
    with torch.no_grad():
        step.proj.weight.zero_()
        step.proj.bias.zero_()
    torch.testing.assert_close(step(x, skip), step.refine(up))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="fusion"):
        FCN(3, 1, 2, fusion="max")
    with pytest.raises(ValueError, match="spatial_dims"):
        FCN(4, 1, 2)


def _step(net: FCN) -> None:
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    loss = net(torch.randn(2, 1, 20, 24, 16)).square().mean()
    loss.backward()
    opt.step()


def test_freeze_encoder_trains_only_decoder():
    torch.manual_seed(0)
    net = FCN(3, 1, 3, features=(4, 8, 16)).train()
    net.freeze_encoder()
    enc_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    _step(net)
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), k
    changed = [k for k, v in net.decoder.state_dict().items() if not torch.equal(v, dec_before[k])]
    assert changed, "no decoder weight changed"
    assert not net.encoder.training and net.decoder.training
    net.freeze_encoder(False)
    assert all(p.requires_grad for p in net.encoder.parameters())


def test_load_encoder_from_checkpoint(tmp_path):
    source = FCN(3, 1, 3, features=(4, 8, 16))
    target = FCN(3, 1, 5, features=(4, 8, 16))  # another head: only the encoder must match
    for name, payload in {
        "full.pt": source.state_dict(),
        "encoder.pt": source.encoder.state_dict(),
        "train.pt": {"network": source.state_dict(), "optimizer": {}},
    }.items():
        torch.save(payload, tmp_path / name)
        target.load_encoder(tmp_path / name)
        for k, v in source.encoder.state_dict().items():
            assert torch.equal(target.encoder.state_dict()[k], v), (name, k)
    wider = FCN(3, 1, 3, features=(8, 16, 32))
    with pytest.raises(RuntimeError):
        wider.load_encoder(tmp_path / "full.pt")


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_torchscript_script_and_trace(fusion):
    net = FCN(3, 1, 3, features=(4, 8, 16), fusion=fusion).eval()
    x = torch.randn(1, 1, 19, 22, 13)
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(x), net(x))
    traced = torch.jit.trace(net, x)
    torch.testing.assert_close(traced(x), net(x))


@pytest.mark.parametrize("dims, shape", [(3, (21, 30, 17)), (2, (37, 45))])
def test_deep_supervision_stacks_scales_in_training_only(dims, shape):
    net = FCN(dims, 1, 3, features=(4, 8, 16, 32), deep_supervision=2)
    x = torch.randn(2, 1, *shape)
    stacked = net(x)
    assert stacked.shape == (2, 3, 3, *shape)
    # scale k: head k on decoder output k, upsampled by 2**k and cropped (odd sizes included)
    scales = net.decoder.scales(net.encoder(x))
    mode = "bilinear" if dims == 2 else "trilinear"
    for k in (1, 2):
        up = F.interpolate(net.deep_heads[k - 1](scales[k]), scale_factor=2.0**k, mode=mode, align_corners=False)
        torch.testing.assert_close(stacked[:, k], up[(..., *(slice(0, n) for n in shape))])
    net.eval()
    plain = net(x)
    assert plain.shape == (2, 3, *shape)
    # instance norm uses the same statistics in both modes: scale 0 is the plain output
    torch.testing.assert_close(stacked[:, 0], plain)


def test_deep_supervision_trains_the_heads_and_scripts():
    net = FCN(3, 1, 2, features=(4, 8, 16), deep_supervision=1)
    x = torch.randn(1, 1, 9, 10, 11)
    net(x)[:, 1].square().mean().backward()
    assert net.deep_heads[0].weight.grad.abs().sum() > 0
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(x), net(x))
    torch.testing.assert_close(scripted.eval()(x), net.eval()(x))
    with pytest.raises(ValueError, match="deep_supervision"):
        FCN(3, 1, 2, features=(4, 8, 16), deep_supervision=2)


def test_encoder_blocks_add_residual_blocks_and_keep_old_keys():
    plain = FCN(3, 1, 3, features=(4, 8, 16))
    same = FCN(3, 1, 3, features=(4, 8, 16), encoder_blocks=(1, 1, 1))
    assert plain.state_dict().keys() == same.state_dict().keys()
    deep = FCN(3, 1, 3, features=(4, 8, 16), encoder_blocks=(1, 3, 2))
    residual = [m for m in deep.encoder.modules() if isinstance(m, ResidualBlock)]
    assert len(residual) == 2 + 1
    x = torch.randn(2, 1, 19, 22, 13)
    assert deep(x).shape == (2, 3, 19, 22, 13)
    # y = x + block(x): zeroing the last norm's affine leaves the identity, so the stage output
    # equals its input
    block = residual[-1]
    last_norm = [m for m in block.block.modules() if isinstance(m, nn.InstanceNorm3d)][-1]
    with torch.no_grad():
        last_norm.weight.zero_()
        last_norm.bias.zero_()
    z = torch.randn(1, 16, 3, 3, 3)
    # leaky ReLU of zero is zero
    torch.testing.assert_close(block(z), z)
    torch.testing.assert_close(torch.jit.script(deep.eval())(x), deep.eval()(x))


def test_encoder_blocks_bad_counts_raise():
    with pytest.raises(ValueError, match="encoder_blocks"):
        FCN(3, 1, 3, features=(4, 8, 16), encoder_blocks=(1, 2))
    with pytest.raises(ValueError, match="encoder_blocks"):
        FCN(3, 1, 3, features=(4, 8, 16), encoder_blocks=(1, 0, 1))


def test_encoder_blocks_in_2d_and_transfer_between_equal_encoders(tmp_path):
    source = FCN(2, 1, 3, features=(4, 8, 16), encoder_blocks=(2, 1, 2))
    assert source(torch.randn(1, 1, 37, 45)).shape == (1, 3, 37, 45)
    torch.save(source.state_dict(), tmp_path / "deep.pt")
    target = FCN(2, 1, 5, features=(4, 8, 16), encoder_blocks=(2, 1, 2))
    target.load_encoder(tmp_path / "deep.pt")
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(target.encoder.state_dict()[k], v), k
    with pytest.raises(RuntimeError):
        FCN(2, 1, 3, features=(4, 8, 16)).load_encoder(tmp_path / "deep.pt")
