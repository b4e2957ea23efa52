"""The precision engines (precision.py) and the optimizer (recipe.py): apex through a stand-in, fused SGD after
skipped steps, loss-scaler checkpoints across device kinds, fixed loss scales, and what an apex request does
without apex.amp."""
import os
import subprocess
import sys
import types

import pytest
import torch

import main
from helpers import ROOT, expect_error, poison_loss, run_main_in_process, tiny_flags, weights
from standins import apex_amp, npu_grad_scaler
from training import devices, recipe
from training.precision import ApexAmp, NativeAmp, build_precision


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


# --- fused SGD after skipped first steps ---

@pytest.fixture
def uninitialised_is_nan(monkeypatch):
    """torch.empty_like gives NaN instead of whatever the memory held (often zeros, by chance), so that a buffer
    allocated and never written shows in every run. Fused SGD allocates its momentum buffers with it."""
    monkeypatch.setattr(torch, "empty_like", lambda tensor, **options: torch.full_like(tensor, float("nan"), **options))


def _sgd_steps(kind, losses, nesterov, resume_from=None):
    """``recipe.build_optimizer(kind)`` SGD on CPU tensors ("cuda": fused, CPU's fused kernel), stepped through
    NativeAmp with a real GradScaler, which hands the fused step its found_inf and grad_scale. The weights after
    each step."""
    args = main.parse_args(["--dummy", "--momentum", "0.9", "--lr", "0.1", "--wd", "1e-4"])
    args.nesterov = nesterov
    weight = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))
    optimizer = recipe.build_optimizer(kind, [{"params": [weight], "weight_decay": args.weight_decay}], args)
    assert optimizer.param_groups[0]["fused"] == (kind == "cuda")
    if resume_from is not None:
        kernels = {key: optimizer.param_groups[0][key] for key in ("fused", "foreach")}
        optimizer.load_state_dict(resume_from)
        optimizer.param_groups[0].update(kernels)  # as main.resume does: this device's kernels
    precision = NativeAmp("cpu", "dynamic", "float16")
    steps = []
    for factor in losses:
        precision.step((weight * torch.arange(12.).reshape(3, 4) * factor).sum(), optimizer)
        steps.append(weight.detach().clone())
    return steps, optimizer


@pytest.mark.parametrize("skipped", [1, 3])
@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_after_skipped_first_steps_steps_like_unfused_sgd(skipped, nesterov, uninitialised_is_nan):
    """The first applied step equals unfused SGD's to the bit, and the skipped steps leave no trace: the later
    steps equal those of fused SGD that skipped nothing (they differ from unfused SGD's by float rounding, as they
    do without skipped steps: the kernels round differently)."""
    applied = [1.0, -0.5, 2.0]
    fused, _ = _sgd_steps("cuda", [1e36] * skipped + applied, nesterov)  # 1e36 * 2**16 overflows: skipped
    unfused, _ = _sgd_steps("cpu", [1e36] * skipped + applied, nesterov)
    fused_without_skips, _ = _sgd_steps("cuda", applied, nesterov)
    assert torch.equal(fused[skipped - 1], torch.linspace(-1, 1, 12).reshape(3, 4))
    assert torch.equal(fused[skipped], unfused[skipped]), (fused[skipped] - unfused[skipped]).abs().max()
    for a, b, c in zip(fused[skipped:], fused_without_skips, unfused[skipped:]):
        assert torch.equal(a, b), (a - b).abs().max()
        torch.testing.assert_close(a, c)


def test_fused_sgd_resumed_without_momentum_state_steps_like_unfused_sgd(uninitialised_is_nan):
    """A checkpoint written before any applied step (no momentum buffers), resumed into fused SGD; and fused
    SGD's state dict (zero buffers, never stepped) resumed into unfused SGD."""
    _, empty = _sgd_steps("cpu", [], True)
    empty = empty.state_dict()
    losses = [1e36, 1.0, -0.5]
    _, resumed = _sgd_steps("cuda", [], True, resume_from=empty)
    (state,) = resumed.state.values()
    assert torch.equal(state["momentum_buffer"], torch.zeros(3, 4))
    fused, _ = _sgd_steps("cuda", losses, True, resume_from=empty)
    unfused, _ = _sgd_steps("cpu", losses, True, resume_from=empty)
    assert torch.equal(fused[1], unfused[1]) and torch.equal(fused[2], _sgd_steps("cuda", losses[1:], True)[0][1])
    _, never_stepped = _sgd_steps("cuda", [], True)
    resumed, _ = _sgd_steps("cpu", losses, True, resume_from=never_stepped.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed, unfused))


# --- NVIDIA apex without apex.amp ---

def test_apex_backend_on_cuda_without_apex_amp_points_at_native_amp(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))  # NVIDIA apex 25.07 and later
    monkeypatch.setitem(sys.modules, "apex.amp", None)
    monkeypatch.setattr(devices, "resolve_device_kind", lambda requested: "cuda")
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "--amp", "--amp-backend", "apex")],
                 "NVIDIA apex removed it in 2025 (25.05 was the last release with it)", "--amp-backend native")


@pytest.mark.parametrize("device_name, message", [
    ("gpu", "NVIDIA apex removed apex.amp in 2025 (25.05 was the last release with it)"),
    ("cpu", "apex runs on an NPU or a GPU"),
])
def test_launcher_amp_level_o2_without_apex_amp_is_a_clear_error(tmp_path, device_name, message):
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("")  # NVIDIA apex 25.07 and later: no apex.amp
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", os.path.join(ROOT, "test", "train_performance_1p.sh"),
                             f"--device={device_name}", "--amp_level=O2", f"--output_root={tmp_path / 'out'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "--amp_level=O1" in result.stderr, result.stderr
    assert "running:" not in result.stdout


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
