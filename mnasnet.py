"""MnasNet (https://arxiv.org/abs/1807.11626): B1, the variant torchvision ships, and A1, the paper's headline
network (squeeze-and-excitation in three of its stages).

B1's module layout, state-dict keys and the init of the convolutions match ``torchvision.models.mnasnet*``,
so checkpoints move both ways. A1's module names and state-dict keys are timm's (``semnasnet_*``), so timm's
weights load as they are (timm's B1 weights need renaming: see timm_keys.py).

Both classifiers start from N(0, 0.01), as torchvision's MobileNets do: the kaiming init torchvision uses here
scales with 1/num_classes, and with a few classes (the demo's 10) it starts at logits of +-30 and a loss near
20 that wrecks the first steps. There is no ``pretrained`` download: main.py loads weights from a file.
"""
import math
import warnings

from torch import nn

__all__ = [
    "A1_ARCHS",
    "ARCHS",
    "B1_ARCHS",
    "MNASNet",
    "MnasNetA1",
    "TF_BN_MOMENTUM",
    "mnasnet0_5",
    "mnasnet0_75",
    "mnasnet1_0",
    "mnasnet1_3",
    "mnasnet_a1",
    "mnasnet_a1_0_75",
    "mnasnet_a1_1_4",
    "set_bn_momentum",
]

# The paper's TensorFlow BN decay 0.9997, as PyTorch momentum (the weight of the new batch).
TF_BN_MOMENTUM = 1 - 0.9997

# Widths at alpha 1.0: stem conv, stem separable conv, then one per stack below.
_BASE_DEPTHS = (32, 16, 24, 40, 80, 96, 192, 320)
# One row per stack of inverted residuals: kernel size, stride of its first block, expansion, blocks.
_STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))
# Width of the last conv, fixed for every alpha.
_HEAD_CHANNELS = 1280
# Version-1 checkpoints did not scale the stem with alpha.
_V1_STEM_DEPTHS = (32, 16)


def _scale_depth(channels, alpha, divisor=8):
    """Scale to a multiple of ``divisor``; round down only when that loses at most 10%."""
    scaled = channels * alpha
    depth = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if depth < 0.9 * scaled:
        depth += divisor
    return depth


def _depths(alpha):
    return [_scale_depth(channels, alpha) for channels in _BASE_DEPTHS]


def _conv_bn(in_ch, out_ch, kernel_size, bn_momentum, stride=1, groups=1, relu=True):
    """Conv + BN (+ ReLU) as a flat list: torchvision's keys index the modules one by one."""
    layers = [
        # No conv bias: the BN right after it has its own shift.
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch, momentum=bn_momentum),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


def _stem(conv_ch, out_ch, bn_momentum):
    """3x3 stride-2 conv, then a depthwise separable conv with a linear output and no skip."""
    return [
        *_conv_bn(3, conv_ch, 3, bn_momentum, stride=2),
        *_conv_bn(conv_ch, conv_ch, 3, bn_momentum, groups=conv_ch),
        *_conv_bn(conv_ch, out_ch, 1, bn_momentum, relu=False),
    ]


class _InvertedResidual(nn.Module):
    """1x1 expansion, depthwise kxk, linear 1x1 projection; identity skip when shapes allow."""

    def __init__(self, in_ch, out_ch, kernel_size, stride, expansion, bn_momentum):
        super().__init__()
        mid_ch = in_ch * expansion
        self.use_skip = stride == 1 and in_ch == out_ch
        self.layers = nn.Sequential(
            *_conv_bn(in_ch, mid_ch, 1, bn_momentum),
            *_conv_bn(mid_ch, mid_ch, kernel_size, bn_momentum, stride=stride, groups=mid_ch),
            *_conv_bn(mid_ch, out_ch, 1, bn_momentum, relu=False),
        )

    def forward(self, x):
        out = self.layers(x)
        return out + x if self.use_skip else out


def _stack(in_ch, out_ch, kernel_size, stride, expansion, blocks, bn_momentum):
    """Only the first block changes width and resolution, so only the later ones can skip."""
    return nn.Sequential(
        _InvertedResidual(in_ch, out_ch, kernel_size, stride, expansion, bn_momentum),
        *(_InvertedResidual(out_ch, out_ch, kernel_size, 1, expansion, bn_momentum) for _ in range(blocks - 1)),
    )


class MNASNet(nn.Module):
    """MnasNet-B1 with depth multiplier ``alpha``; input N x 3 x H x W, output N x num_classes logits."""

    # Version 2 scales the stem with alpha; _load_from_state_dict still reads version-1 checkpoints.
    _version = 2

    def __init__(self, alpha, num_classes=1000, dropout=0.2):
        super().__init__()
        if alpha <= 0.0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.num_classes = num_classes
        depths = _depths(alpha)
        layers = _stem(depths[0], depths[1], TF_BN_MOMENTUM)
        in_ch = depths[1]
        for out_ch, stack in zip(depths[2:], _STACKS):
            layers.append(_stack(in_ch, out_ch, *stack, TF_BN_MOMENTUM))
            in_ch = out_ch
        layers += _conv_bn(in_ch, _HEAD_CHANNELS, 1, TF_BN_MOMENTUM)
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(_HEAD_CHANNELS, num_classes))
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.layers(x)
        # Global average pooling, spatial dimensions dropped.
        x = x.mean([2, 3])
        return self.classifier(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # No version means the state dict lost its metadata (e.g. rebuilt as a plain dict):
        # treat it as the current layout rather than refusing it.
        version = local_metadata.get("version", self._version)
        if version not in (1, 2):
            error_msgs.append(f"unsupported MNASNet checkpoint version {version!r} (expected 1 or 2)")
            return
        self.use_layout(version)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def use_layout(self, version):
        """Build the stem of checkpoint layout ``version`` (1 or 2), as loading such a checkpoint does. Rebuilding
        replaces modules, so a run calls this before an optimizer, apex or DDP take the parameters; loading the
        checkpoint afterwards rebuilds nothing."""
        # At alpha 1.0 the two versions are identical.
        if version == 1 and self.alpha != 1.0 and self._version != 1:
            self._use_v1_stem()
            warnings.warn(
                "This MNASNet checkpoint has the version-1 layout (stem not scaled with alpha); "
                "the model's stem was rebuilt to match it and will be saved as version 1.",
                UserWarning,
            )

    def _use_v1_stem(self):
        """Replace the stem and the first stack (its input width changes) with the version-1 shapes."""
        # Match the modules being replaced: the model may already be moved, in eval mode or
        # have its BN momentum changed when the checkpoint arrives.
        reference = self.layers[0].weight
        bn_momentum = self.layers[1].momentum
        conv_ch, out_ch = _V1_STEM_DEPTHS
        v1_layers = _stem(conv_ch, out_ch, bn_momentum)
        v1_layers.append(_stack(out_ch, _depths(self.alpha)[2], *_STACKS[0], bn_momentum))
        for index, module in enumerate(v1_layers):
            module.to(device=reference.device, dtype=reference.dtype).train(self.training)
            self.layers[index] = module
        # state_dict() must now say version 1, or a re-saved checkpoint would not load back.
        self._version = 1


def set_bn_momentum(model, momentum):
    """Set ``momentum`` on every BatchNorm (SyncBatchNorm included); return how many were set."""
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"BN momentum must be in [0, 1] (or None), got {momentum}")
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
            count += 1
    return count


def mnasnet0_5(*, num_classes=1000, dropout=0.2):
    """MnasNet-B1, depth multiplier 0.5."""
    return MNASNet(0.5, num_classes=num_classes, dropout=dropout)


def mnasnet0_75(*, num_classes=1000, dropout=0.2):
    """MnasNet-B1, depth multiplier 0.75."""
    return MNASNet(0.75, num_classes=num_classes, dropout=dropout)


def mnasnet1_0(*, num_classes=1000, dropout=0.2):
    """MnasNet-B1, depth multiplier 1.0."""
    return MNASNet(1.0, num_classes=num_classes, dropout=dropout)


def mnasnet1_3(*, num_classes=1000, dropout=0.2):
    """MnasNet-B1, depth multiplier 1.3."""
    return MNASNet(1.3, num_classes=num_classes, dropout=dropout)


B1_ARCHS = {
    "mnasnet0_5": mnasnet0_5,
    "mnasnet0_75": mnasnet0_75,
    "mnasnet1_0": mnasnet1_0,
    "mnasnet1_3": mnasnet1_3,
}


# MnasNet-A1. One row per stage after the stem: kernel size, stride of its first block, expansion, output width
# at alpha 1.0, blocks, squeeze-and-excitation.
_A1_STEM_CHANNELS, _A1_SEPARABLE_CHANNELS = 32, 16
_A1_STAGES = (
    (3, 2, 6, 24, 2, False),
    (5, 2, 3, 40, 3, True),
    (3, 2, 6, 80, 4, False),
    (3, 1, 6, 112, 2, True),
    (5, 2, 6, 160, 3, True),
    (3, 1, 6, 320, 1, False),
)
# The squeeze's width as a fraction of the block's input width (the paper's TF code and timm size it so).
_A1_SE_RATIO = 0.25
# A1's BatchNorm epsilon, as in timm's port of the TF weights.
_A1_BN_EPS = 1e-5


class _SqueezeExcite(nn.Module):
    """Channel gates from the global average: 1x1 reduce, ReLU, 1x1 expand, sigmoid (timm's key names)."""

    def __init__(self, channels, squeezed):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, squeezed, 1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        scale = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(scale)


def _bn(channels, bn_momentum):
    return nn.BatchNorm2d(channels, eps=_A1_BN_EPS, momentum=bn_momentum)


class _A1SeparableConv(nn.Module):
    """The stem's depthwise 3x3 + ReLU, then a linear 1x1; no skip (the paper's first block)."""

    def __init__(self, in_ch, out_ch, bn_momentum):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False)
        self.bn1 = _bn(in_ch, bn_momentum)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn2 = _bn(out_ch, bn_momentum)

    def forward(self, x):
        return self.bn2(self.conv_pw(self.act1(self.bn1(self.conv_dw(x)))))


class _A1InvertedResidual(nn.Module):
    """1x1 expansion, depthwise kxk, optional squeeze-and-excitation, linear 1x1 projection; identity skip when
    shapes allow."""

    def __init__(self, in_ch, out_ch, kernel_size, stride, expansion, squeeze_excite, bn_momentum):
        super().__init__()
        mid_ch = in_ch * expansion
        self.use_skip = stride == 1 and in_ch == out_ch
        self.conv_pw = nn.Conv2d(in_ch, mid_ch, 1, bias=False)
        self.bn1 = _bn(mid_ch, bn_momentum)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_dw = nn.Conv2d(mid_ch, mid_ch, kernel_size, stride=stride, padding=kernel_size // 2,
                                 groups=mid_ch, bias=False)
        self.bn2 = _bn(mid_ch, bn_momentum)
        self.act2 = nn.ReLU(inplace=True)
        # round() as timm's SqueezeExcite does, so its checkpoints fit at every width.
        self.se = _SqueezeExcite(mid_ch, round(in_ch * _A1_SE_RATIO)) if squeeze_excite else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid_ch, out_ch, 1, bias=False)
        self.bn3 = _bn(out_ch, bn_momentum)

    def forward(self, x):
        out = self.act2(self.bn2(self.conv_dw(self.act1(self.bn1(self.conv_pw(x))))))
        out = self.bn3(self.conv_pwl(self.se(out)))
        return out + x if self.use_skip else out


class MnasNetA1(nn.Module):
    """MnasNet-A1 with depth multiplier ``alpha``; input N x 3 x H x W, output N x num_classes logits.

    Widths are rounded as B1's (and timm's) are, the 1280-wide head is not scaled. Convolutions start from
    TF's init (normal, std sqrt(2 / fan_out), fan_out per group), the classifier from N(0, 0.01) as B1's.
    """

    def __init__(self, alpha, num_classes=1000, dropout=0.2):
        super().__init__()
        if alpha <= 0.0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.num_classes = num_classes
        stem_ch = _scale_depth(_A1_STEM_CHANNELS, alpha)
        self.conv_stem = nn.Conv2d(3, stem_ch, 3, stride=2, padding=1, bias=False)
        self.bn1 = _bn(stem_ch, TF_BN_MOMENTUM)
        self.act1 = nn.ReLU(inplace=True)
        in_ch = _scale_depth(_A1_SEPARABLE_CHANNELS, alpha)
        stages = [nn.Sequential(_A1SeparableConv(stem_ch, in_ch, TF_BN_MOMENTUM))]
        for kernel_size, stride, expansion, channels, blocks, squeeze_excite in _A1_STAGES:
            out_ch = _scale_depth(channels, alpha)
            stage = []
            for index in range(blocks):
                stage.append(_A1InvertedResidual(in_ch, out_ch, kernel_size, stride if index == 0 else 1, expansion,
                                                 squeeze_excite, TF_BN_MOMENTUM))
                in_ch = out_ch
            stages.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(in_ch, _HEAD_CHANNELS, 1, bias=False)
        self.bn2 = _bn(_HEAD_CHANNELS, TF_BN_MOMENTUM)
        self.act2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(p=dropout)
        self.classifier = nn.Linear(_HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = self.act2(self.bn2(self.conv_head(x)))
        # Global average pooling, spatial dimensions dropped.
        return self.classifier(self.dropout(x.mean((2, 3))))


def mnasnet_a1(*, num_classes=1000, dropout=0.2):
    """MnasNet-A1, depth multiplier 1.0 (timm's semnasnet_100)."""
    return MnasNetA1(1.0, num_classes=num_classes, dropout=dropout)


def mnasnet_a1_0_75(*, num_classes=1000, dropout=0.2):
    """MnasNet-A1, depth multiplier 0.75 (timm's semnasnet_075)."""
    return MnasNetA1(0.75, num_classes=num_classes, dropout=dropout)


def mnasnet_a1_1_4(*, num_classes=1000, dropout=0.2):
    """MnasNet-A1, depth multiplier 1.4 (timm's semnasnet_140)."""
    return MnasNetA1(1.4, num_classes=num_classes, dropout=dropout)


A1_ARCHS = {
    "mnasnet_a1": mnasnet_a1,
    "mnasnet_a1_0_75": mnasnet_a1_0_75,
    "mnasnet_a1_1_4": mnasnet_a1_1_4,
}
ARCHS = {**B1_ARCHS, **A1_ARCHS}
