"""training/precision.py: apex (NVIDIA's and Ascend's) through stand-ins, loss-scaler checkpoints across device
kinds, fixed loss scales, the scaler's verdict kept on the device, and autocast around depthwise convolutions."""
import sys
import types

import pytest
import torch
import torchvision

import main
from helpers import expect_error, poison_loss, run_main_in_process, tiny_flags, weights
from standins import apex_amp, npu_grad_scaler
from training import devices
from training.meters import SkippedSteps
from training.precision import ApexAmp, NativeAmp, build_precision

# --- Ascend apex master: combined gradients, and torch.nn.Module.zero_grad that refuses set_to_none=True ---

@pytest.fixture
def ascend_apex_on_cpu(monkeypatch):
    """apex.amp (the stand-in of Ascend apex master) initialised as on an NPU (combine_grad), on a run whose checks
    see a GPU machine and which then trains on the CPU."""
    apex_amp.install(monkeypatch)
    monkeypatch.setattr(devices, "resolve_device_kind", lambda requested: "cuda")
    monkeypatch.setattr(devices, "device_count", lambda kind: 1)
    prepare, build_precision = main.prepare, main.build_precision

    def prepared_then_on_the_cpu(args):
        prepare(args)
        args.device_kind = "cpu"
    monkeypatch.setattr(main, "prepare", prepared_then_on_the_cpu)
    monkeypatch.setattr(main, "build_precision", lambda kind, *rest: build_precision("npu", *rest))


def test_the_stand_in_module_zero_grad_refuses_set_to_none(monkeypatch):
    apex_amp.install(monkeypatch)
    weight = torch.nn.Parameter(torch.ones(3))
    apex_amp.initialize(weight, torch.optim.SGD([weight], lr=0.1), combine_grad=True)
    with pytest.raises(AssertionError, match="set_to_none"):
        torch.nn.Linear(2, 2).zero_grad(set_to_none=True)


@pytest.mark.parametrize("opt_level, extra", [("O1", ["--model-ema", "--model-ema-steps", "1"]), ("O2", [])])
def test_training_under_ascend_apex_master_keeps_the_combined_gradients(image_folder, tmp_path, ascend_apex_on_cpu,
                                                                        opt_level, extra):
    """Nothing on the training path (steps, EMA, validation, checkpoints) calls Module.zero_grad with
    set_to_none=True, which apex's replacement refuses, and every step zeroes the gradients through the optimizer's
    zero_grad(), in place: at the end the parameters hold the gradients the first backward made."""
    summary = run_main_in_process(image_folder, *tiny_flags(tmp_path, "--epochs", "2", "--amp", "--amp-backend", "apex",
                                                            "--opt-level", opt_level, *extra))
    assert torch.nn.Module.zero_grad is apex_amp.zero_grad  # still apex's (install() puts torch's back after the test)
    assert summary["train_steps"] == 8 and summary["val_images"] == 15
    (optimizer,) = apex_amp.initialized_optimizers
    stash = optimizer._amp_stash
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(stash.zeroed_grads) == 8 - (opt_level == "O1")  # O1 zeroes in place once combined, after step 1
    first = stash.combined_grads if opt_level == "O1" else stash.zeroed_grads[1]
    assert len(first) == len(params) and all(p.grad is grad for p, grad in zip(params, first, strict=True))


@pytest.fixture
def apex_on_cpu(monkeypatch):
    """apex.amp (the stand-in) on a run whose checks see a CUDA machine and which then trains on the CPU: the
    user-facing refusal of apex on the CPU stays as it is."""
    apex_amp.install(monkeypatch)
    monkeypatch.setattr(devices, "resolve_device_kind", lambda requested: "cuda")
    monkeypatch.setattr(devices, "device_count", lambda kind: 1)
    prepare = main.prepare

    def prepared_then_on_the_cpu(args):
        prepare(args)
        args.device_kind = "cpu"
    monkeypatch.setattr(main, "prepare", prepared_then_on_the_cpu)


# --- apex's zero_grad takes no arguments ---

def test_apex_o2_trains_with_its_zero_grad_that_takes_no_arguments(image_folder, tmp_path, apex_on_cpu):
    summary = run_main_in_process(image_folder, *tiny_flags(tmp_path, "--epochs", "1", "--amp", "--amp-backend", "apex",
                                                            "--opt-level", "O2", "--no-val"))
    assert summary["train_steps"] == 4 and summary["skipped_steps"] == 0
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "checkpoint.pth.tar").values())
    (optimizer,) = apex_amp.initialized_optimizers
    zeroed = optimizer._amp_stash.zeroed_grads  # the gradients each step's zero_grad() found
    assert len(zeroed) == 4 and not zeroed[0] and all(a is b for a, b in zip(zeroed[1], zeroed[3]))


def test_apex_combined_gradients_are_zeroed_in_place_never_freed(monkeypatch):
    """Ascend apex on NPU (build_precision asks for combine_grad there): the gradients are views of combined
    buffers, which must stay the same tensors."""
    apex_amp.install(monkeypatch)
    args = main.parse_args(["--dummy", "--amp", "--amp-backend", "apex", "--lr", "0.1", "--momentum", "0"])
    weight = torch.nn.Parameter(torch.ones(4))
    model, optimizer, precision = build_precision("npu", weight, torch.optim.SGD([weight], lr=0.1), args)
    grads = []
    for _ in range(3):
        assert precision.step((weight * 2).sum(), optimizer)
        grads.append(weight.grad)
    assert grads[0] is grads[1] is grads[2]
    torch.testing.assert_close(weight.detach(), torch.full((4,), 0.4))  # three applied steps of grad 2


# --- NVIDIA apex without apex.amp ---

def test_apex_backend_on_cuda_without_apex_amp_points_at_native_amp(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))  # NVIDIA apex 25.07 and later
    monkeypatch.setitem(sys.modules, "apex.amp", None)
    monkeypatch.setattr(devices, "resolve_device_kind", lambda requested: "cuda")
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "--amp", "--amp-backend", "apex")],
                 "NVIDIA apex removed it in 2025 (25.05 was the last release with it)", "--amp-backend native")


# --- loss-scaler checkpoints between device kinds ---

@pytest.fixture
def npu_scaler(monkeypatch):
    """torch.npu.amp.GradScaler, the stand-in, for NativeAmp("npu")."""
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(amp=types.SimpleNamespace(
        GradScaler=npu_grad_scaler.GradScaler)), raising=False)


def _cpu_scaler_amp(loss_scale="dynamic"):
    """NativeAmp("cpu") in float16: torch.amp's GradScaler, as on CUDA (the same class and state dict)."""
    return NativeAmp("cpu", loss_scale, "float16")


def _overflow_once(precision):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for factor in (float("inf"), 1.0, 1.0):
        precision.step((weight * factor).sum(), optimizer)


def test_a_scaler_checkpoint_resumes_across_device_kinds(monkeypatch, npu_scaler):
    cuda_like = _cpu_scaler_amp()
    _overflow_once(cuda_like)
    saved = cuda_like.state_dict()
    assert "dynamic" not in saved["scaler"] and saved["scaler"]["_growth_tracker"] == 2
    npu = NativeAmp("npu", "dynamic")
    npu.load_state_dict(saved)
    assert npu.scaler.get_scale() == 2. ** 15 and npu.scaler._dynamic
    assert npu.state_dict()["scaler"]["_growth_tracker"] == 2

    _overflow_once(npu)
    back = _cpu_scaler_amp()
    back.load_state_dict(npu.state_dict())
    assert back.scaler.get_scale() == 2. ** 14 and back.state_dict()["scaler"]["_growth_tracker"] == 2


def test_a_loss_scale_resumes_across_apex_and_native_amp(monkeypatch):
    """An Ascend apex run goes on with native AMP on CUDA (where apex.amp is gone), and back."""
    apex_amp.install(monkeypatch)
    native = _cpu_scaler_amp()
    _overflow_once(native)
    weight = torch.nn.Parameter(torch.ones(3))
    _, optimizer = apex_amp.initialize(weight, torch.optim.SGD([weight], lr=0.1), opt_level="O1")
    apex = ApexAmp(apex_amp, "O1", "dynamic")
    apex.load_state_dict(native.state_dict())
    assert apex.state_dict() == {"apex": {"loss_scaler0": {"loss_scale": 2. ** 15, "unskipped": 2}}}
    apex.step((weight * float("inf")).sum(), optimizer)
    native_again = _cpu_scaler_amp()
    native_again.load_state_dict(apex.state_dict())
    assert native_again.scaler.get_scale() == 2. ** 14 and native_again.state_dict()["scaler"]["_growth_tracker"] == 0


# --- apex's skipped steps ---

@pytest.mark.parametrize("loss_scale", ["dynamic", "128"])
def test_apex_counts_skipped_steps(image_folder, tmp_path, monkeypatch, apex_on_cpu, loss_scale):
    poison_loss(monkeypatch, {2, 3, 6})
    summary = run_main_in_process(image_folder, *tiny_flags(tmp_path, "--epochs", "2", "--amp", "--amp-backend", "apex",
                                                            "--loss-scale", loss_scale, "--no-val"))
    assert summary["skipped_steps"] == 3 and [h["skipped_steps"] for h in summary["history"]] == [2, 1]
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "checkpoint.pth.tar").values())
    scale = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["precision"]["apex"]["loss_scaler0"]
    assert scale["loss_scale"] == (2. ** 13 if loss_scale == "dynamic" else 128.0)


def test_apex_stops_when_the_loss_stays_non_finite(image_folder, tmp_path, monkeypatch, apex_on_cpu, capsys):
    poison_loss(monkeypatch, set(range(2, 100)))
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "--epochs", "2", "--amp", "--amp-backend", "apex",
                                                    "--max-nonfinite-steps", "3")],
                 "not finite at epoch 0, step 4/4 (3 step(s) in a row)")


# --- a fixed loss scale stays fixed ---

@pytest.mark.parametrize("kind", ["cpu", "npu"])
def test_a_fixed_loss_scale_skips_overflowing_steps_and_stays_fixed(monkeypatch, npu_scaler, kind):
    precision = _cpu_scaler_amp("128") if kind == "cpu" else NativeAmp("npu", "128")
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for bad in (True, False, True, True, False):
        before = weight.detach().clone()
        verdict = precision.step((weight * (float("nan") if bad else 1.0)).sum(), optimizer)
        assert torch.is_tensor(verdict) and bool(verdict) == (not bad)
        assert torch.equal(weight.detach(), before if bad else before - 0.1)
        assert precision.scaler.get_scale() == 128.0
    resumed = _cpu_scaler_amp("256")
    resumed.load_state_dict(precision.state_dict())
    assert resumed.scaler.get_scale() == 256.0  # the command line's fixed scale, not the checkpoint's


@pytest.mark.parametrize("flags, fragment", [
    (["--amp-dtype", "float16"], "--amp-dtype float16 sets the precision of --amp: add --amp"),
    (["--amp", "--amp-dtype", "bfloat16", "--amp-backend", "apex"], "apex casts to float16 only"),
    (["--amp", "--loss-scale", "128", "--init-loss-scale", "1024"], "--init-loss-scale starts a dynamic"),
    (["--amp", "--init-loss-scale", "0"], "--init-loss-scale must be a positive number"),
])
def test_precision_options_that_do_not_fit_are_one_line(image_folder, tmp_path, capsys, flags, fragment):
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), *flags], fragment)


def test_the_loss_scalers_verdict_stays_on_the_device(monkeypatch):
    """Skipped steps are counted on the device: no host sync per step (get_scale() would make two)."""
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", lambda self: pytest.fail("get_scale() syncs the host"))
    precision = NativeAmp("cpu", "dynamic", "float16")
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    skipped = SkippedSteps()
    for bad in (False, True, True, False, True):
        verdict = precision.step((weight * (float("nan") if bad else 1.0)).sum(), optimizer)
        assert torch.is_tensor(verdict) and bool(verdict) == (not bad)
        skipped.add(verdict)
    skipped.add(True)  # a bool verdict (fp32) counts alike
    assert (skipped.total(), skipped.longest_run()) == (3, 2)
    assert torch.isfinite(weight).all() and not torch.equal(weight, torch.ones(3))


def test_depthwise_convolutions_leave_autocast_only_in_training(bf16_cpu):
    model = torchvision.models.mnasnet0_5(num_classes=3)
    precision = NativeAmp("cpu", "dynamic")
    precision.prepare(model)
    depthwise = model.layers[3]  # the stem's 3x3 depthwise convolution
    dtypes = []
    depthwise.register_forward_hook(lambda module, args, output: dtypes.append((args[0].dtype, output.dtype)))
    x = torch.randn(2, 3, 48, 48)
    for mode in (model.train, model.eval):
        mode()
        with precision.autocast():
            assert model(x).dtype == precision.dtype
    # Training: fp32 in (computed in fp32), bf16 out; evaluation: the bf16 convolution.
    assert dtypes == [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]
