"""mnasnet.py against torchvision's MnasNet: weights both ways, outputs, init, version-1 checkpoints."""
import ast
import inspect
import warnings

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import mnasnet
from helpers import NON_UNIT_ARCHS, assert_same_state, randomize, v1_checkpoint

PARAM_COUNTS = {
    "mnasnet0_5": 2_218_512,
    "mnasnet0_75": 3_170_208,
    "mnasnet1_0": 4_383_312,
    "mnasnet1_3": 6_282_256,
}
ARCH_NAMES = list(PARAM_COUNTS)


pytestmark = pytest.mark.usefixtures("one_thread")


def _ours(arch, **kwargs):
    return mnasnet.ARCHS[arch](**kwargs)


def _torchvision(arch, **kwargs):
    return getattr(tvm, arch)(**kwargs)


def _input(seed=0):
    # Small for speed; batch 2 keeps two values per channel for train-mode BN at the final 1x1 map.
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _assert_close_state(a, b):
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_param_count(arch):
    ours = sum(p.numel() for p in _ours(arch).parameters())
    assert ours == PARAM_COUNTS[arch]
    assert ours == sum(p.numel() for p in _torchvision(arch).parameters())


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_same_init_and_bn_momentum_as_torchvision(arch):
    torch.manual_seed(0)
    theirs = _torchvision(arch)
    torch.manual_seed(0)
    ours = _ours(arch)
    classifier = "classifier.1.weight"
    assert_same_state({k: v for k, v in ours.state_dict().items() if k != classifier},
                      {k: v for k, v in theirs.state_dict().items() if k != classifier})
    # Our classifier init does not grow with fewer classes (torchvision's does).
    for classes in (10, 1000):
        weight = mnasnet.ARCHS[arch](num_classes=classes).classifier[1].weight
        assert weight.std().item() == pytest.approx(0.01, rel=0.1)
    momenta = {m.momentum for m in ours.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {m.momentum for m in theirs.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {mnasnet.TF_BN_MOMENTUM}
    assert mnasnet.TF_BN_MOMENTUM == pytest.approx(1 - 0.9997)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_state_dict_both_ways(arch):
    theirs = randomize(_torchvision(arch), seed=2)
    ours = _ours(arch)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_same_state(ours.state_dict(), theirs.state_dict())

    ours = randomize(_ours(arch), seed=3)
    assert ours.state_dict()._metadata[""]["version"] == 2
    theirs = _torchvision(arch)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_state(theirs.state_dict(), ours.state_dict())


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_eval_outputs_match(arch):
    theirs = randomize(_torchvision(arch)).eval()
    ours = _ours(arch).eval()
    ours.load_state_dict(theirs.state_dict())
    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_train_outputs_grads_and_stats_match(arch):
    theirs = randomize(_torchvision(arch)).train()
    ours = _ours(arch).train()
    ours.load_state_dict(theirs.state_dict())
    x = _input()
    outputs = []
    for model in (ours, theirs):
        # Same seed right before the forward: both models must draw the same dropout mask.
        torch.manual_seed(123)
        out = model(x)
        out.square().mean().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1])
    # Running statistics moved by the same BN momentum.
    _assert_close_state(ours.state_dict(), theirs.state_dict())
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_num_classes_and_dropout_honoured(arch):
    ours = _ours(arch, num_classes=10, dropout=0.5)
    assert ours.num_classes == 10
    assert ours.classifier[0].p == 0.5
    assert ours.classifier[1].out_features == 10
    with torch.no_grad():
        assert ours.eval()(_input()).shape == (2, 10)
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in _torchvision(arch, num_classes=10, dropout=0.5).parameters())


def test_dropout_active_only_when_asked():
    x = _input()
    with torch.no_grad():
        for p, differs in ((0.5, True), (0.0, False)):
            model = _ours("mnasnet0_5", dropout=p).train()
            torch.manual_seed(0)
            first = model(x)
            torch.manual_seed(1)
            assert torch.equal(first, model(x)) is not differs


@pytest.mark.parametrize("arch", NON_UNIT_ARCHS)
def test_version1_checkpoint_like_torchvision(arch):
    v1 = v1_checkpoint(arch)
    theirs = _torchvision(arch)
    with pytest.warns(UserWarning):
        theirs.load_state_dict(v1)
    ours = _ours(arch)
    with pytest.warns(UserWarning, match="version-1"):
        ours.load_state_dict(v1)
    assert ours.layers[0].out_channels == 32
    assert ours.layers[6].out_channels == 16
    assert ours.layers[8][0].layers[0].in_channels == 16
    assert_same_state(ours.state_dict(), theirs.state_dict())

    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))

    # Re-saved as version 1, so it loads back into a fresh model of either implementation.
    resaved = ours.state_dict()
    assert resaved._metadata[""]["version"] == 1
    again = _torchvision(arch)
    with pytest.warns(UserWarning):
        again.load_state_dict(resaved)
    assert_same_state(again.state_dict(), v1)


def test_version1_stem_keeps_mode_and_bn_momentum():
    v1 = v1_checkpoint("mnasnet0_5")
    ours = _ours("mnasnet0_5").eval()
    mnasnet.set_bn_momentum(ours, 0.01)
    with pytest.warns(UserWarning):
        ours.load_state_dict(v1)
    assert not any(m.training for m in ours.modules())
    assert {m.momentum for m in ours.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}


def test_a_version1_stem_built_up_front_keeps_its_parameters_when_the_checkpoint_loads():
    """An optimizer built after use_layout(1) holds the parameters that loading the checkpoint fills."""
    v1 = v1_checkpoint("mnasnet0_5")
    ours = _ours("mnasnet0_5")
    with pytest.warns(UserWarning, match="version-1"):
        ours.use_layout(1)
    parameters = list(ours.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing rebuilt
        ours.load_state_dict(v1)
    assert all(new is old for new, old in zip(ours.parameters(), parameters, strict=True))
    assert_same_state(ours.state_dict(), v1)


def test_version1_at_alpha_one_changes_nothing():
    state = _torchvision("mnasnet1_0").state_dict()
    state._metadata[""]["version"] = 1
    ours = _ours("mnasnet1_0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.load_state_dict(state)
    assert_same_state(ours.state_dict(), state)
    assert ours.state_dict()._metadata[""]["version"] == 2


def test_state_dict_without_metadata_loads_as_current():
    # A dict comprehension (e.g. stripping "module.") drops _metadata; torchvision would refuse it.
    source = randomize(_ours("mnasnet0_5"))
    plain = {k: v for k, v in source.state_dict().items()}
    ours = _ours("mnasnet0_5")
    ours.load_state_dict(plain)
    assert_same_state(ours.state_dict(), source.state_dict())


def test_unknown_version_is_rejected():
    state = _ours("mnasnet0_5").state_dict()
    state._metadata[""]["version"] = 3
    with pytest.raises(RuntimeError, match="version 3"):
        _ours("mnasnet0_5").load_state_dict(state)


def test_set_bn_momentum():
    model = _ours("mnasnet0_5")
    expected = sum(isinstance(m, nn.BatchNorm2d) for m in _torchvision("mnasnet0_5").modules())
    assert mnasnet.set_bn_momentum(model, 0.01) == expected
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}

    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert mnasnet.set_bn_momentum(synced, 0.1) == expected
    assert {m.momentum for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)} == {0.1}

    with pytest.raises(ValueError):
        mnasnet.set_bn_momentum(model, 1.5)


def test_archs_and_alpha_check():
    assert set(mnasnet.B1_ARCHS) == set(ARCH_NAMES)
    assert mnasnet.ARCHS == {**mnasnet.B1_ARCHS, **mnasnet.A1_ARCHS}
    for name, builder in mnasnet.ARCHS.items():
        assert builder.__name__ == name
    with pytest.raises(ValueError):
        mnasnet.MNASNet(0.0)


def test_model_module_does_not_import_torchvision():
    tree = ast.parse(inspect.getsource(mnasnet))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any(name.split(".")[0] == "torchvision" for name in imported)
