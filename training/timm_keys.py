"""timm's MnasNet state dicts in this project's layouts.

timm's ``semnasnet_*`` (MnasNet-A1) keys are already ours: mnasnet.MnasNetA1 uses timm's module names. timm's
``mnasnet_*`` (MnasNet-B1) computes the same function as torchvision's network (same blocks, widths, rounding,
BN epsilon and padding) under other module names; ``b1_from_timm`` renames its keys into torchvision's layout,
the one mnasnet.MNASNet has.
"""
import collections
import re

# timm's model names and the arch here that holds the same network.
TIMM_ARCHS = {
    "mnasnet_050": "mnasnet0_5",
    "mnasnet_075": "mnasnet0_75",
    "mnasnet_100": "mnasnet1_0",
    "semnasnet_075": "mnasnet_a1_0_75",
    "semnasnet_100": "mnasnet_a1",
    "semnasnet_140": "mnasnet_a1_1_4",
}

# timm's modules outside the inverted-residual stages, and their place in torchvision's flat ``layers``
# (the ReLUs, which hold no tensors, sit at 2, 5 and 16).
_B1_FLAT = {
    "conv_stem": "layers.0",
    "bn1": "layers.1",
    "blocks.0.0.conv_dw": "layers.3",
    "blocks.0.0.bn1": "layers.4",
    "blocks.0.0.conv_pw": "layers.6",
    "blocks.0.0.bn2": "layers.7",
    "conv_head": "layers.14",
    "bn2": "layers.15",
    "classifier": "classifier.1",
}
# An inverted residual's modules and their index in torchvision's ``block.layers`` (ReLUs at 2 and 5).
_B1_BLOCK = {"conv_pw": 0, "bn1": 1, "conv_dw": 3, "bn2": 4, "conv_pwl": 6, "bn3": 7}
# timm's stage 1 (its first inverted residuals) is torchvision's layers.8.
_B1_STAGE_OFFSET = 7
_STAGE_MODULE = re.compile(r"blocks\.([1-9][0-9]*)\.([0-9]+)\.(\w+)")


def is_timm_layout(state):
    """Whether a state dict has timm's EfficientNet-family names (A1 here, or a timm B1 file)."""
    return "conv_stem.weight" in state


def b1_from_timm(state):
    """A timm B1 state dict with torchvision's keys, same tensors, same order. Keys B1 does not have (e.g. an A1
    file's squeeze-excite) are kept as they are, for the caller to report as unexpected."""
    renamed = collections.OrderedDict((_b1_key(key), value) for key, value in state.items())
    # timm scales the stem with the width, as torchvision's version-2 layout does; torchvision's own MNASNet
    # refuses a state dict that does not say its version.
    renamed._metadata = collections.OrderedDict({"": {"version": 2}})
    return renamed


def _b1_key(key):
    module, _, tensor = key.rpartition(".")
    if module in _B1_FLAT:
        return f"{_B1_FLAT[module]}.{tensor}"
    match = _STAGE_MODULE.fullmatch(module)
    if match and match.group(3) in _B1_BLOCK:
        stage, block, name = match.groups()
        return f"layers.{int(stage) + _B1_STAGE_OFFSET}.{block}.layers.{_B1_BLOCK[name]}.{tensor}"
    return key
