"""MnasNet-A1 against timm's semnasnet_*, and timm's weights (B1 and A1) through checkpoint.load_model_weights."""
import pytest
import timm
import torch
import torchvision
from torch import nn

import export_onnx
import mnasnet
from helpers import (NETWORK, ConvolutionDtypes, expect_error, launch_ok, onnx_matches_torch, randomize, read_case,
                     run_main_in_process, tiny_flags)
from training import checkpoint, engine, timm_keys
from training.precision import NativeAmp
from training.utils import UserError

# Ours and timm's name for each A1 width, with the parameter count both have (1000 classes).
A1_PAIRS = {
    "mnasnet_a1_0_75": ("semnasnet_075", 2_912_278),
    "mnasnet_a1": ("semnasnet_100", 3_887_038),
    "mnasnet_a1_1_4": ("semnasnet_140", 6_105_992),
}
# timm's B1 and the torchvision-layout arch here that holds it.
B1_PAIRS = {"mnasnet_050": "mnasnet0_5", "mnasnet_075": "mnasnet0_75", "mnasnet_100": "mnasnet1_0"}


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.fixture(scope="module")
def a1_run(image_folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("a1")
    # Measured best Acc@1 with seeds 0, 1, 2: 86.7, 73.3, 93.3 (chance 33.3).
    summary = run_main_in_process(image_folder, *tiny_flags(output_dir, "-a", "mnasnet_a1_0_75", "--epochs", "8",
                                                            "--warmup", "1", "--seed", "0"))
    return output_dir, summary


def test_a1_trains_and_learns_through_main(a1_run):
    output_dir, summary = a1_run
    history = summary["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert summary["best_acc1"] > 100 / 3 + 30  # three classes: chance is 33%
    saved = torch.load(output_dir / checkpoint.CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert saved["arch"] == "mnasnet_a1_0_75"
    # Our A1 checkpoints are timm's layout: timm's own network reads them.
    timm.create_model("semnasnet_075", pretrained=False, num_classes=3).load_state_dict(saved["state_dict"])


def test_a1_exports_to_onnx_and_matches_onnxruntime(a1_run, tmp_path):
    output_dir, _ = a1_run
    out = tmp_path / "a1.onnx"
    export_onnx.main([str(output_dir / checkpoint.CHECKPOINT_NAME), "-o", str(out), "--image-size", "64"])
    model, _ = checkpoint.load_model(str(output_dir / checkpoint.CHECKPOINT_NAME))
    assert isinstance(model, mnasnet.MnasNetA1)
    onnx_matches_torch(out, model, 64)


def test_a1_evaluate_reproduces_best_accuracy(a1_run, image_folder, tmp_path):
    output_dir, summary = a1_run
    result = run_main_in_process(image_folder, *tiny_flags(tmp_path, "-a", "mnasnet_a1_0_75", "-e", "--resume",
                                                           str(output_dir / checkpoint.BEST_NAME)))
    assert result["val_acc1"] == pytest.approx(summary["best_acc1"])


def test_launchers_pass_an_a1_arch_through_to_main(tmp_path):
    launch_ok("train_performance_1p.sh", "--device=cpu", "--batch_size=4", "--steps=2", "--workers=0",
              f"--output_root={tmp_path}", "--", "--arch", "mnasnet_a1_0_75", "--train-crop-size", "48",
              "--dummy-images", "8")
    _, summary = read_case(tmp_path / "0", f"{NETWORK}_bs4_1p_perf")
    assert summary["arch"] == "mnasnet_a1_0_75" and summary["train_steps"] == 2
