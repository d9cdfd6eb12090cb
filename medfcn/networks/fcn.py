"""A fully convolutional network with skip fusion at every scale, for 2D and 3D.

The design follows Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic
Segmentation" (CVPR 2015): a convolution-and-pooling encoder, a decoder of transposed
convolutions (``Y = W^T * X``), and skip connections fused by summation (``Y = F1(X) + F2(X)``).
FCN-8s fuses three scales; here every encoder scale is fused, as in a U-Net, but by sum
rather than concatenation unless ``fusion="concat"`` is asked for.

There is no fully connected layer, so any input size works; the output always has the
input's spatial shape. Pooling is per scale and per axis (``strides``), as in nnU-Net, so that an
axis that is already coarse (5 mm slices) or short is not pooled at the first scales.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool
from torch import nn

__all__ = [
    "FCN",
    "ConvBlock",
    "ResidualBlock",
    "Encoder",
    "Decoder",
    "FuseUp",
    "pooling_factors",
    "cumulative_factors",
    "transfer_encoder",
]

Strides = Sequence[int | Sequence[int]]


def _axis_factors(entry, spatial_dims: int) -> tuple[int, ...] | None:
    """One ``strides`` entry as a ``spatial_dims``-tuple of 1s and 2s, or None if it is not one."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        entry = (entry,) * spatial_dims
    if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != spatial_dims:
        return None
    if any(isinstance(v, bool) or v not in (1, 2) for v in entry):
        return None
    return tuple(int(v) for v in entry)


def pooling_factors(strides: Strides | None, spatial_dims: int, scales: int) -> tuple[tuple[int, ...], ...]:
    """``strides`` checked and spelled out: one ``spatial_dims``-tuple of 1s and 2s per scale past
    the first (``scales - 1`` of them); ``None`` is 2 on every axis at every scale.

    Raises:
        ValueError: a wrong number of entries, an entry of another length, or a factor not 1 or 2.
    """
    if strides is None:
        return ((2,) * spatial_dims,) * (scales - 1)
    ok = isinstance(strides, Sequence) and not isinstance(strides, str) and len(strides) == scales - 1
    factors = [_axis_factors(entry, spatial_dims) for entry in strides] if ok else [None]
    if None in factors:
        raise ValueError(
            f"strides needs {scales - 1} entries (one per scale past the first), each 1, 2 or a list of "
            f"{spatial_dims} of them (1: that axis is not pooled, 2: halved), got {strides!r}."
        )
    return tuple(factors)


def cumulative_factors(factors: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Per scale, finest first, how many input voxels one voxel spans per axis: the product of
    the pooling ``factors`` (from :func:`pooling_factors`) up to that scale; scale 0 is all 1s.
    Scale ``k`` of an input ``S`` has shape ``ceil(S / cumulative_factors(factors)[k])``."""
    spans = [tuple(1 for _ in factors[0])] if factors else []
    for f in factors:
        spans.append(tuple(a * b for a, b in zip(spans[-1], f, strict=True)))
    return spans


class ConvBlock(nn.Sequential):
    """Two ``conv -> norm -> dropout -> act`` units (MONAI's default order); keeps the spatial shape.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        act, norm, dropout, bias: as in :class:`monai.networks.blocks.Convolution`.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, act, norm, dropout, bias: bool):
        super().__init__()
        for i, cin in enumerate((in_channels, out_channels)):
            conv = Convolution(
                spatial_dims, cin, out_channels, kernel_size=3, act=act, norm=norm, dropout=dropout, bias=bias
            )
            self.add_module(f"conv_{i}", conv)


class ResidualBlock(nn.Module):
    """``y = x + ConvBlock(x)``: two more convolutions at a scale, with an identity shortcut so
    that a deeper encoder stays as easy to optimise as a shallow one. Unlike a ResNet (or
    nnU-Net's residual encoder) block, the activation comes before the sum, so the block's
    output stays a :class:`ConvBlock`'s. Input and output ``(B, channels, *S)``."""

    def __init__(self, spatial_dims: int, channels: int, act, norm, dropout, bias: bool):
        super().__init__()
        self.block = ConvBlock(spatial_dims, channels, channels, act, norm, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """Convolution blocks separated by max pooling.

    Input ``(B, in_channels, *S)``; returns one feature map per scale, finest first:
    scale ``k`` has ``features[k]`` channels and spatial shape ``ceil(S / prod(strides[:k]))``
    per axis (``ceil(S / 2**k)`` with the default ``strides``; see :func:`pooling_factors`).
    The pooling before scale ``k`` has kernel = stride = ``strides[k - 1]``, so an axis with
    factor 1 keeps its size. Pooling uses ``ceil_mode`` so that a 1-voxel-thick or odd-sized
    input never shrinks to zero. Scale ``k`` runs ``blocks[k]`` two-convolution blocks (default one each):
    a :class:`ConvBlock`, then ``blocks[k] - 1`` :class:`ResidualBlock` s.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        features: Sequence[int],
        act,
        norm,
        dropout,
        bias,
        blocks: Sequence[int] | None = None,
        strides: Strides | None = None,
    ):
        super().__init__()
        blocks = [1] * len(features) if blocks is None else [int(b) for b in blocks]
        if len(blocks) != len(features) or min(blocks) < 1:
            raise ValueError(f"encoder_blocks needs one count >= 1 per scale ({len(features)}), got {blocks}.")
        factors = pooling_factors(strides, spatial_dims, len(features))
        pool = Pool["MAX", spatial_dims]
        stages = []
        for k, width in enumerate(features):
            cin = in_channels if k == 0 else features[k - 1]
            layers = [pool(kernel_size=factors[k - 1], ceil_mode=True)] if k > 0 else []
            layers.append(ConvBlock(spatial_dims, cin, width, act, norm, dropout, bias))
            layers += [ResidualBlock(spatial_dims, width, act, norm, dropout, bias) for _ in range(blocks[k] - 1)]
            # one block at the finest scale stays a bare ConvBlock, so the keys of weights saved
            # before encoder_blocks existed still load
            stages.append(layers[0] if len(layers) == 1 else nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips: list[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


def crop_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Crop ``x`` ``(B, C, *s)`` to the spatial shape of ``like`` ``(B', C', *S)``, ``S <= s``.

    Ceil-mode pooling rounds coarse maps up, so a map upsampled by its pooling factors can be a
    few voxels larger than the finer map on odd axes; the extra voxels lie past the input's end.
    """
    for dim in range(2, x.dim()):
        x = x.narrow(dim, 0, like.shape[dim])
    return x


class FuseUp(nn.Module):
    """One decoder step: upsample by a transposed convolution, fuse the skip, refine.

    ``sum`` fusion: ``y = up(x) + proj(skip)`` where ``proj`` is a 1x1 convolution to the
    decoder width (the FCN-8s score fusion). ``concat`` fusion: ``y = conv([up(x), skip])``.
    ``up`` has kernel = stride = ``stride`` (the pooling factors between the two scales, an int
    or one per axis), so each coarse voxel paints exactly the fine voxels it pooled.

    Args:
        x: ``(B, in_channels, *s)``, the coarser decoder feature.
        skip: ``(B, skip_channels, *S)`` with ``S <= stride * s`` per axis.

    Returns:
        ``(B, out_channels, *S)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        fusion: str,
        act,
        norm,
        dropout,
        bias,
        stride: int | Sequence[int] = 2,
    ):
        super().__init__()
        if fusion not in ("sum", "concat"):
            raise ValueError(f"fusion must be 'sum' or 'concat', got {fusion!r}.")
        self.fusion = fusion
        conv_t = Conv["CONVTRANS", spatial_dims]
        self.up = conv_t(in_channels, out_channels, kernel_size=stride, stride=stride, bias=bias)
        if fusion == "sum":
            self.proj = Conv["CONV", spatial_dims](skip_channels, out_channels, kernel_size=1, bias=bias)
            refine_in = out_channels
        else:
            self.proj = nn.Identity()
            refine_in = out_channels + skip_channels
        self.refine = ConvBlock(spatial_dims, refine_in, out_channels, act, norm, dropout, bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = crop_to(self.up(x), skip)
        if self.fusion == "sum":
            fused = up + self.proj(skip)
        else:
            fused = torch.cat([up, skip], dim=1)
        return self.refine(fused)


class Decoder(nn.Module):
    """Fuses encoder features from coarsest to finest; returns the finest-scale feature.

    Input: the encoder's list (finest first). Output ``(B, features[0], *S)``. ``strides`` as
    the encoder's (:func:`pooling_factors`): each step upsamples by the factors its scale pooled.
    """

    def __init__(
        self,
        spatial_dims: int,
        features: Sequence[int],
        fusion: str,
        act,
        norm,
        dropout,
        bias,
        strides: Strides | None = None,
    ):
        super().__init__()
        factors = pooling_factors(strides, spatial_dims, len(features))
        steps = []
        for k in range(len(features) - 1, 0, -1):
            cin, cout = features[k], features[k - 1]
            steps.append(FuseUp(spatial_dims, cin, cout, cout, fusion, act, norm, dropout, bias, factors[k - 1]))
        self.steps = nn.ModuleList(steps)

    def scales(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every decoder output, finest first: ``(B, features[k], *ceil(S / prod(strides[:k])))``
        for ``k = 0 .. len(features) - 2``."""
        x = skips[-1]
        n = len(skips)
        outputs: list[torch.Tensor] = []
        for i, step in enumerate(self.steps):
            x = step(x, skips[n - 2 - i])
            outputs.insert(0, x)
        return outputs

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.scales(skips)[0]


class FCN(nn.Module):
    """Skip-fusion FCN for 2D or 3D segmentation; returns raw logits.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels (modalities).
        out_channels: number of classes, background included.
        features: channels per encoder scale, finest first. ``len(features) - 1`` poolings,
            so the receptive field grows with the length. Defaults to ``(32, 64, 128, 256)``.
        strides: for each scale past the first (``len(features) - 1`` entries), its pooling
            factor relative to the previous scale per spatial axis: 2 halves that axis, 1 leaves
            it (an axis that is already coarse, e.g. 5 mm slices, or short); an int is the same
            on every axis. Scale ``k`` has spatial shape ``ceil(S / prod(strides[:k]))`` per
            axis. Default ``None``: 2 everywhere. Pooling has no weights, so the strides do not
            change the state dict's keys or shapes of the encoder; the decoder's transposed
            convolutions have kernel = stride, so theirs follow the strides.
        fusion: ``"sum"`` (default, ``Y = F1(X) + F2(X)``) or ``"concat"``.
        act: activation, a MONAI layer spec. Defaults to leaky ReLU (slope 0.01).
        norm: normalisation, a MONAI layer spec. Defaults to instance norm with affine.
        dropout: dropout probability or spec; default no dropout.
        bias: convolution bias.
        deep_supervision: number of coarser decoder scales that get their own 1x1 head and are
            supervised in training (0: off). In training mode the output is then
            ``(B, 1 + deep_supervision, out_channels, *S)``: the full-resolution logits first,
            then each coarser head's logits upsampled (linear, by its scale's cumulative pooling
            factor per axis, cropped) to ``S``; train it with
            :class:`medfcn.losses.DeepSupervisionLoss`. In eval mode the heads are skipped and
            the output is ``(B, out_channels, *S)`` as without them.
        encoder_blocks: two-convolution blocks per encoder scale, finest first (default one
            each); the blocks past the first are residual (:class:`ResidualBlock`). A block
            costs time in proportion to its scale's voxels and parameters in proportion to its
            width squared (3D, 192 channels: 2 M), so depth is cheapest in time at the coarse
            scales and in parameters at the fine ones.

    Input ``(B, in_channels, *S)``, any ``S`` (odd sizes included); output
    ``(B, out_channels, *S)``.

    Examples::

        # 3D, 1 modality, 3 classes
        net = FCN(spatial_dims=3, in_channels=1, out_channels=3)
        net(torch.zeros(1, 1, 35, 51, 32)).shape  # (1, 3, 35, 51, 32)

        # 2D, concatenation fusion
        net = FCN(2, 3, 2, features=(16, 32, 64), fusion="concat")
        net(torch.zeros(2, 3, 37, 45)).shape  # (2, 2, 37, 45)

        # 3D, 5 mm slices on the last axis: pooled in-plane only for the first two scales
        net = FCN(3, 1, 2, features=(8, 16, 32, 64, 128), strides=[[2, 2, 1], [2, 2, 1], 2, 2])
        net(torch.zeros(1, 1, 37, 45, 5)).shape  # (1, 2, 37, 45, 5); scales' last axis 5, 5, 5, 3, 2
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (32, 64, 128, 256),
        fusion: str = "sum",
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float | tuple | None = None,
        bias: bool = True,
        deep_supervision: int = 0,
        encoder_blocks: Sequence[int] | None = None,
        strides: Strides | None = None,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if len(features) < 2:
            raise ValueError("features needs at least two scales.")
        if not 0 <= deep_supervision <= len(features) - 2:
            raise ValueError(f"deep_supervision must be in [0, {len(features) - 2}], got {deep_supervision}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        features = tuple(int(f) for f in features)
        self.strides = pooling_factors(strides, spatial_dims, len(features))
        self.encoder = Encoder(
            spatial_dims, in_channels, features, act, norm, dropout, bias, encoder_blocks, self.strides
        )
        self.decoder = Decoder(spatial_dims, features, fusion, act, norm, dropout, bias, self.strides)
        self.head = Conv["CONV", spatial_dims](features[0], out_channels, kernel_size=1, bias=True)
        self.deep_heads = nn.ModuleList(
            Conv["CONV", spatial_dims](features[k], out_channels, kernel_size=1, bias=True)
            for k in range(1, deep_supervision + 1)
        )
        # per deep head, the factor per axis that brings its scale back to the input's
        self._head_factors = [[float(f) for f in span] for span in cumulative_factors(self.strides)[1:]]
        self._upsample_mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self._encoder_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encoder(x)
        if not (self.training and len(self.deep_heads) > 0):
            return self.head(self.decoder(skips))
        scales = self.decoder.scales(skips)
        out = self.head(scales[0])
        # upsampling the coarse logits (3 channels) is cheaper than keeping one label map per
        # scale, and it lets MONAI's trainer pass one tensor to the loss, as with DynUNet.
        outputs = [out]
        for k, head in enumerate(self.deep_heads):
            # upsample by the exact cumulative pooling factor per axis and crop, as the decoder
            # does, so a coarse voxel stays over the fine voxels it pooled on odd-sized axes too
            up = F.interpolate(
                head(scales[k + 1]), scale_factor=self._head_factors[k], mode=self._upsample_mode, align_corners=False
            )
            outputs.append(crop_to(up, out))
        return torch.stack(outputs, dim=1)

    def load_encoder(self, path: str, map_location: str | torch.device = "cpu") -> None:
        """Initialise the encoder from a checkpoint of another FCN.

        ``path`` holds a state dict of a whole FCN (keys ``encoder.*``), of an encoder alone,
        or a training checkpoint with a ``network`` entry. Its encoder must have this one's
        ``features`` and ``encoder_blocks`` (same keys and shapes). Pooling is not part of the
        weights (max pooling has none), so an encoder trained with other ``strides`` loads too:
        its convolutions then see features pooled differently from those they were trained on.
        """
        state = torch.load(path, map_location=map_location, weights_only=True)
        if isinstance(state, dict) and "network" in state:
            state = state["network"]
        prefix = "encoder."
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        self.encoder.load_state_dict(state, strict=True)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Stop (or restart) gradient updates of the encoder; decoder and head still train.

        Norm layers of a frozen encoder are put in eval mode as well, so their running
        statistics (where tracked) stay fixed too.
        """
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self._encoder_frozen = frozen
        self.encoder.train(self.training and not frozen)

    def train(self, mode: bool = True) -> FCN:
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.train(False)
        return self


def transfer_encoder(network: FCN, checkpoint: str | None = None, freeze: bool = False) -> FCN:
    """Transfer learning for bundle configs: initialise ``network``'s encoder from ``checkpoint``
    (see :meth:`FCN.load_encoder`) and optionally freeze it, so that only the decoder trains.

    ``checkpoint=None`` and ``freeze=False`` return the network unchanged.
    """
    if checkpoint:
        network.load_encoder(checkpoint)
    if freeze:
        network.freeze_encoder()
    return network
