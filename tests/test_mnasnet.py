"""mnasnet.py: MnasNet-B1 against torchvision's (weights both ways, outputs, init, version-1 checkpoints) and
MnasNet-A1 against timm's semnasnet_* (keys, function, timm's weights for B1 and A1)."""
import ast
import inspect
import warnings

import pytest
import timm
import torch
import torchvision
import torchvision.models as tvm
from torch import nn

import mnasnet
from helpers import (NON_UNIT_ARCHS, ConvolutionDtypes, assert_same_state, expect_error, randomize, tiny_flags,
                     v1_checkpoint)
from training import checkpoint, engine, timm_keys
from training.precision import NativeAmp
from training.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# Ours and timm's name for each A1 width, with the parameter count both have (1000 classes).
A1_PAIRS = {
    "mnasnet_a1_0_75": ("semnasnet_075", 2_912_278),
    "mnasnet_a1": ("semnasnet_100", 3_887_038),
    "mnasnet_a1_1_4": ("semnasnet_140", 6_105_992),
}


# timm's B1 and the torchvision-layout arch here that holds it.
B1_PAIRS = {"mnasnet_050": "mnasnet0_5", "mnasnet_075": "mnasnet0_75", "mnasnet_100": "mnasnet1_0"}


def _timm(name, seed=0, **kwargs):
    """timm's network with every weight, bias and BN statistic moved off its init, so outputs depend on all of
    them (the squeeze-excite's convolution biases start at zero)."""
    model = randomize(timm.create_model(name, pretrained=False, **kwargs), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.1, generator=gen)
    return model


def _input(size=64, seed=0):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_same_function(ours, theirs, x, in_our_layout=dict):
    """Equal eval outputs; in training (same dropout draw), equal outputs, gradients and running statistics.
    ``in_our_layout`` renames a dict of timm's keys to ours."""
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    for model in (ours, theirs):
        mnasnet.set_bn_momentum(model, 0.1)
    outputs = []
    for model in (ours.train(), theirs.train()):
        torch.manual_seed(123)  # the same dropout mask
        out = model(x)
        out.square().mean().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1])
    their_state = in_our_layout(theirs.state_dict())
    assert list(their_state) == list(ours.state_dict())
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, their_state[key], msg=key)
    their_grads = in_our_layout({name: param.grad for name, param in theirs.named_parameters()})
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, their_grads[name], msg=name)


@pytest.mark.parametrize("arch", A1_PAIRS)
def test_a1_has_timms_keys_shapes_and_parameter_count(arch):
    timm_name, count = A1_PAIRS[arch]
    ours, theirs = mnasnet.ARCHS[arch](), timm.create_model(timm_name, pretrained=False)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == count
    # Squeeze-and-excitation in the paper's three stages (3 + 2 + 3 blocks), nowhere else.
    squeezed = [name for name, module in ours.named_modules() if isinstance(module, mnasnet._SqueezeExcite)]
    assert [name.split(".")[1] for name in squeezed] == ["2"] * 3 + ["4"] * 2 + ["5"] * 3


@pytest.mark.parametrize("arch", A1_PAIRS)
def test_a1_computes_timms_function_in_training_and_evaluation(arch):
    theirs = _timm(A1_PAIRS[arch][0], drop_rate=0.2)
    ours = mnasnet.ARCHS[arch](dropout=0.2)
    ours.load_state_dict(theirs.state_dict())
    _assert_same_function(ours, theirs, _input())


def test_a1_num_classes_dropout_and_width_check():
    model = mnasnet.mnasnet_a1_0_75(num_classes=10, dropout=0.5)
    assert model.num_classes == 10 and model.classifier.out_features == 10 and model.dropout.p == 0.5
    with torch.no_grad():
        assert model.eval()(_input(48)).shape == (2, 10)
    # Same start as B1's classifier (see mnasnet.py): small logits whatever the class count.
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    with pytest.raises(ValueError):
        mnasnet.MnasNetA1(0.0)


@pytest.mark.parametrize("timm_name", B1_PAIRS)
def test_timm_b1_weights_give_timms_outputs_through_our_b1(timm_name, tmp_path):
    """timm's B1 file, saved and read as --pretrained reads it, computes timm's function in our torchvision-layout
    network: the renaming is exact and the two implementations are the same network."""
    theirs = _timm(timm_name, seed=1, drop_rate=0.2)
    path = tmp_path / "timm.pth"
    torch.save(theirs.state_dict(), path)
    arch = B1_PAIRS[timm_name]
    ours = mnasnet.ARCHS[arch]()
    checkpoint.load_model_weights(ours, checkpoint.load_file(str(path)), arch, str(path))
    reference = getattr(torchvision.models, arch)()  # torchvision's own network, given timm's renamed weights
    reference.load_state_dict(timm_keys.b1_from_timm(theirs.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(_input()), theirs.eval()(_input()))
    _assert_same_function(ours, theirs, _input(), timm_keys.b1_from_timm)
    assert checkpoint.fitting_archs(theirs.state_dict()) == [arch]


def test_timm_a1_file_loads_for_export_and_classify(tmp_path):
    """checkpoint.load_model (export_onnx.py, classify.py): a bare timm file with -a, and timm's train.py checkpoint
    (which names timm's model) without it."""
    theirs = _timm("semnasnet_075", seed=2).eval()
    bare, trained = tmp_path / "bare.pth", tmp_path / "timm_train.pth.tar"
    torch.save(theirs.state_dict(), bare)
    torch.save({"epoch": 3, "arch": "semnasnet_075", "state_dict": theirs.state_dict()}, trained)
    x = _input(48)
    with torch.no_grad():
        expected = theirs(x)
        for path, arch in ((bare, "mnasnet_a1_0_75"), (trained, None)):
            model, _ = checkpoint.load_model(str(path), arch)
            assert isinstance(model, mnasnet.MnasNetA1) and not model.training
            torch.testing.assert_close(model(x), expected)
    with pytest.raises(UserError, match="holds a mnasnet_a1_0_75 model, but -a/--arch is mnasnet_a1$"):
        checkpoint.load_model(str(trained), "mnasnet_a1")


@pytest.mark.parametrize("timm_name, arch, fragment", [
    # timm's B1 at 1.4: no arch here has it (ours is 1.3).
    ("mnasnet_140", "mnasnet1_3", "it fits none of the archs (mnasnet0_5, "),
    # A1 weights given to B1, and B1 weights to A1: the error names the arch that fits.
    ("semnasnet_100", "mnasnet1_0", "it holds -a mnasnet_a1 weights"),
    ("mnasnet_075", "mnasnet_a1_0_75", "it holds -a mnasnet0_75 weights"),
    # The right family at the wrong width.
    ("semnasnet_140", "mnasnet_a1", "it holds -a mnasnet_a1_1_4 weights"),
])
def test_a_file_that_does_not_fit_is_a_one_line_error(timm_name, arch, fragment):
    state = timm.create_model(timm_name, pretrained=False).state_dict()
    with pytest.raises(UserError) as error:
        checkpoint.load_model_weights(mnasnet.ARCHS[arch](), state, arch, "w.pth")
    message = str(error.value)
    assert message.startswith(f"w.pth does not fit {arch}: ") and fragment in message
    assert len(message.splitlines()) == 1


def test_pretrained_file_that_fits_no_arch_stops_main(image_folder, tmp_path, capsys):
    path = tmp_path / "semnasnet_050.pth"
    torch.save(timm.create_model("semnasnet_050", pretrained=False, num_classes=3).state_dict(), path)
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "-a", "mnasnet_a1_0_75", "--pretrained", str(path))],
                 f"{path} does not fit mnasnet_a1_0_75", "it fits none of the archs")


def test_a1_bn_folded_validation_copy_traces_and_matches():
    model = randomize(mnasnet.mnasnet_a1_0_75(num_classes=5)).eval()
    folded = engine.inference_model(model, fuse_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the trained model is left as it was
    x = _input(48)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_cpu_amp_runs_a1_depthwise_convolutions_in_fp32(bf16_cpu):
    """NativeAmp.prepare finds A1's 16 depthwise convolutions (not the squeeze-excite's 1x1s): fp32 forward and
    backward in training, everything else bf16."""
    model = mnasnet.mnasnet_a1_0_75(num_classes=3).train()
    precision = NativeAmp("cpu", "dynamic")
    precision.prepare(model)
    with ConvolutionDtypes() as convolutions:
        with precision.autocast():
            loss = model(_input(48)).float().square().mean()
        loss.backward()
    bf16, fp32 = torch.bfloat16, torch.float32
    # 16 depthwise; stem, separable 1x1, 15 x 2 block 1x1s, 8 x 2 squeeze-excite, head: 49 others.
    assert convolutions.calls == {("forward", True, fp32, fp32): 16, ("backward", True, fp32, fp32): 16,
                                  ("forward", False, bf16, bf16): 49, ("backward", False, bf16, bf16): 49}


PARAM_COUNTS = {
    "mnasnet0_5": 2_218_512,
    "mnasnet0_75": 3_170_208,
    "mnasnet1_0": 4_383_312,
    "mnasnet1_3": 6_282_256,
}


ARCH_NAMES = list(PARAM_COUNTS)


def _ours(arch, **kwargs):
    return mnasnet.ARCHS[arch](**kwargs)


def _torchvision(arch, **kwargs):
    return getattr(tvm, arch)(**kwargs)


def _small_input(seed=0):
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


def _same_weights(arch, training):
    """(ours, torchvision's) with torchvision's random weights in both, in training or evaluation mode."""
    theirs = randomize(_torchvision(arch)).train(training)
    ours = _ours(arch).train(training)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_eval_outputs_match(arch):
    ours, theirs = _same_weights(arch, training=False)
    x = _small_input()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_train_outputs_grads_and_stats_match(arch):
    ours, theirs = _same_weights(arch, training=True)
    x = _small_input()
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
        assert ours.eval()(_small_input()).shape == (2, 10)
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in _torchvision(arch, num_classes=10, dropout=0.5).parameters())


def test_dropout_active_only_when_asked():
    x = _small_input()
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

    x = _small_input()
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
