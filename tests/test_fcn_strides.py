"""medfcn.FCN's per-scale, per-axis pooling (``strides``): shapes on odd sizes in 2D and 3D,
deep supervision, the default being today's network, the shipped weights, bad strides."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medfcn import FCN
from medfcn.bundle import read_config
from medfcn.io import read_checkpoint
from medfcn.networks.fcn import cumulative_factors, pooling_factors

from .conftest import BUNDLES

# (spatial_dims, features, strides, input spatial shape): odd sizes, 1-voxel and short axes
CASES = [
    (3, (4, 8, 16, 32, 48), [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]], (37, 45, 5)),
    (3, (4, 8, 16), [[1, 2, 2], 2], (3, 21, 17)),
    (3, (4, 8, 16), [[2, 2, 1], [2, 2, 1]], (19, 23, 1)),
    (2, (4, 8, 16, 32), [[2, 1], [2, 2], [1, 2]], (37, 45)),
    (2, (4, 8, 16), [1, [2, 1]], (15, 9)),
]


def _expected_scale_shapes(shape, strides):
    """ceil(S / prod(strides[:k])) per axis, for each scale k, computed here independently."""
    dims = len(shape)
    factors = [[s] * dims if isinstance(s, int) else list(s) for s in strides]
    shapes, span = [tuple(shape)], [1] * dims
    for f in factors:
        span = [a * b for a, b in zip(span, f, strict=True)]
        shapes.append(tuple(math.ceil(n / d) for n, d in zip(shape, span, strict=True)))
    return shapes


@pytest.mark.parametrize("dims, features, strides, shape", CASES)
def test_output_and_scale_shapes_follow_the_strides(dims, features, strides, shape):
    net = FCN(dims, 1, 3, features=features, strides=strides).eval()
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        assert net(x).shape == (2, 3, *shape)
        skips = net.encoder(x)
        decoded = net.decoder.scales(skips)
    expected = _expected_scale_shapes(shape, strides)
    assert [tuple(s.shape[2:]) for s in skips] == expected
    assert [s.shape[1] for s in skips] == list(features)
    assert [tuple(s.shape[2:]) for s in decoded] == expected[:-1]


def test_the_issue_example_keeps_the_thin_axis_for_two_scales():
    net = FCN(3, 1, 2, features=(4, 8, 16, 32, 48), strides=[[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]).eval()
    with torch.no_grad():
        skips = net.encoder(torch.randn(1, 1, 37, 45, 5))
    assert [tuple(s.shape[2:]) for s in skips] == [(37, 45, 5), (19, 23, 5), (10, 12, 5), (5, 6, 3), (3, 3, 2)]


@pytest.mark.parametrize("dims, shape", [(3, (21, 30, 5)), (2, (37, 9))])
def test_a_stride_of_one_leaves_that_axis_at_every_scale(dims, shape):
    strides = [[2] * (dims - 1) + [1]] * 3
    net = FCN(dims, 1, 2, features=(4, 8, 16, 32), strides=strides).eval()
    with torch.no_grad():
        skips = net.encoder(torch.randn(1, 1, *shape))
    assert [s.shape[-1] for s in skips] == [shape[-1]] * 4
    assert [s.shape[2] for s in skips] == [math.ceil(shape[0] / 2**k) for k in range(4)]


@pytest.mark.parametrize(
    "dims, strides, shape", [(3, [[2, 2, 1], [2, 2, 1], [2, 2, 2]], (21, 30, 7)), (2, [[2, 1], [2, 2], 2], (37, 9))]
)
def test_deep_supervision_upsamples_by_the_cumulative_factor_per_axis(dims, strides, shape):
    net = FCN(dims, 1, 3, features=(4, 8, 16, 32), deep_supervision=2, strides=strides)
    x = torch.randn(2, 1, *shape)
    stacked = net(x)
    assert stacked.shape == (2, 1 + 2, 3, *shape)
    scales = net.decoder.scales(net.encoder(x))
    mode = "bilinear" if dims == 2 else "trilinear"
    spans = cumulative_factors(pooling_factors(strides, dims, 4))
    for k in (1, 2):
        factor = [float(f) for f in spans[k]]
        up = F.interpolate(net.deep_heads[k - 1](scales[k]), scale_factor=factor, mode=mode, align_corners=False)
        assert all(n >= s for n, s in zip(up.shape[2:], shape, strict=True))
        torch.testing.assert_close(stacked[:, k], up[(..., *(slice(0, n) for n in shape))])
    # TorchScript (the export) takes the per-axis factors too, in both modes
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(x), net(x))
    torch.testing.assert_close(scripted.eval()(x), net.eval()(x))


def test_cumulative_factors_multiply_per_axis():
    factors = pooling_factors([[2, 2, 1], [2, 1, 1], 2], 3, 4)
    assert factors == ((2, 2, 1), (2, 1, 1), (2, 2, 2))
    assert cumulative_factors(factors) == [(1, 1, 1), (2, 2, 1), (4, 2, 1), (8, 4, 2)]


@pytest.mark.parametrize("dims, shape", [(3, (19, 22, 13)), (2, (37, 45))])
def test_default_strides_are_todays_network(dims, shape):
    features = (4, 8, 16, 32)
    built = {}
    for name, strides in (("none", None), ("ints", [2, 2, 2]), ("lists", [[2] * dims] * 3)):
        torch.manual_seed(0)
        kwargs = {} if name == "none" else {"strides": strides}
        built[name] = FCN(dims, 1, 3, features=features, deep_supervision=1, **kwargs)
    x = torch.randn(2, 1, *shape)
    reference = built.pop("none")
    ref_state = reference.state_dict()
    for net in built.values():
        state = net.state_dict()
        assert list(state) == list(ref_state)
        assert all(torch.equal(state[k], ref_state[k]) for k in state)
        assert torch.equal(net(x), reference(x))
        assert torch.equal(net.eval()(x), reference.eval()(x))
        reference.train()


def test_strides_change_no_encoder_weight_and_the_encoder_transfers(tmp_path):
    plain = FCN(3, 1, 3, features=(4, 8, 16))
    strided = FCN(3, 1, 3, features=(4, 8, 16), strides=[[2, 2, 1], [1, 2, 2]])
    shapes = {k: v.shape for k, v in plain.encoder.state_dict().items()}
    assert {k: v.shape for k, v in strided.encoder.state_dict().items()} == shapes
    # the decoder's transposed convolutions have kernel = stride
    assert strided.decoder.steps[0].up.weight.shape[2:] == (1, 2, 2)
    assert strided.decoder.steps[1].up.weight.shape[2:] == (2, 2, 1)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    strided.load_encoder(tmp_path / "plain.pt")
    for k, v in plain.encoder.state_dict().items():
        assert torch.equal(strided.encoder.state_dict()[k], v), k


@pytest.mark.parametrize("source", BUNDLES)
def test_the_shipped_weights_load_strictly(source):
    parser = read_config([source / "configs" / "common.json"])
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, FCN) and net.strides == ((2,) * net.spatial_dims,) * (len(net.encoder.stages) - 1)
    state = read_checkpoint(source / "models" / "model.pt")
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize(
    "strides",
    [
        [2, 2],  # too few entries
        [2, 2, 2, 2],  # too many
        [[2, 2], 2, 2],  # an entry of another length
        [3, 2, 2],  # a factor not 1 or 2
        [[2, 0, 2], 2, 2],
        [True, 2, 2],
        [2.0, 2, 2],
        2,  # not one entry per scale
        "222",
    ],
)
def test_bad_strides_raise(strides):
    with pytest.raises(ValueError, match=r"^strides needs 3 entries .* list of 3 of them .*\.$"):
        FCN(3, 1, 3, features=(4, 8, 16, 32), strides=strides)
