"""Kernel settings (--npu-jit-compile, --npu-internal-format, --tf32), set in distributed.setup_runtime and logged; and
tools/onnx_to_om.py, which turns export_onnx.py's file into ATC commands for Ascend offline inference."""
import os
import shlex
import shutil
import subprocess
import sys

import onnx
import pytest
import torch

import export_onnx
import mnasnet
from helpers import ROOT, device_args, run_main_in_process, tiny_flags
from standins.npu_settings import npu_module
from training import devices, distributed

import onnx_to_om

CHIP_DEFAULT = "torch_npu's default for this chip"


@pytest.fixture
def fake_npu(monkeypatch, no_launcher):
    """torch.npu as torch_npu 2.14.0 makes it, for kernel settings (tests/standins/npu_settings.py). torch's
    privateuse1 backend is not renamed "npu", as torch_npu does: that cannot be undone, and the rest of the test
    process would then look for a torch.npu module (torch.random.fork_rng does), so the settings are applied
    through devices.apply_kernel_settings, which setup_runtime calls, rather than through setup_runtime."""

    def install(binary_by_default):
        module, options, bound = npu_module(binary_by_default)
        monkeypatch.setattr(torch, "npu", module, raising=False)
        monkeypatch.setattr(devices, "import_torch_npu", lambda: True)
        return options, bound
    return install


@pytest.mark.parametrize("binary_by_default, flags, options, described", [
    # auto leaves every option unset: torch_npu's defaults hold.
    (True, {}, {},
     f"binary kernels ({CHIP_DEFAULT}), internal formats {CHIP_DEFAULT}, HF32 convolutions on, HF32 matmuls off "
     "(torch_npu's default)"),
    (False, {}, {},
     f"online-compiled kernels (jit_compile) ({CHIP_DEFAULT}), internal formats {CHIP_DEFAULT}, HF32 convolutions "
     "on, HF32 matmuls off (torch_npu's default)"),
    (True, dict(npu_jit_compile="on", npu_internal_format="off", tf32="on"),
     {"jitCompile": "enable", "ALLOW_INTERNAL_FORMAT": "disable", "ALLOW_CONV_HF32": "enable",
      "ALLOW_MATMUL_HF32": "enable"},
     "online-compiled kernels (jit_compile), internal formats off, HF32 convolutions on, HF32 matmuls on"),
    (False, dict(npu_jit_compile="off", npu_internal_format="on", tf32="off"),
     {"jitCompile": "disable", "ALLOW_INTERNAL_FORMAT": "enable", "ALLOW_CONV_HF32": "disable",
      "ALLOW_MATMUL_HF32": "disable"},
     "binary kernels, internal formats on, HF32 convolutions off, HF32 matmuls off"),
])
def test_npu_settings_go_through_torch_npus_own_names(fake_npu, binary_by_default, flags, options, described):
    set_options, _ = fake_npu(binary_by_default)
    assert devices.apply_kernel_settings("npu", device_args(device_kind="npu", **flags)) == described
    assert set_options == options


def test_the_npu_standin_refuses_misspelled_names():
    """What makes the test above fail on a typo: the real torch_npu setters ignore names they do not know."""
    module, options, _ = npu_module(binary_by_default=True)
    with pytest.raises(AttributeError):
        module.config.allow_internal_formats = False
    with pytest.raises(AttributeError):
        module.conv.allow_tf32 = False
    with pytest.raises(AttributeError):
        module.config.allow_internal_format  # noqa: B018  (torch_npu has no getter: never read it)
    with pytest.raises(TypeError):
        module.set_compile_mode(jit=False)
    with pytest.raises(TypeError):
        module.matmul.allow_hf32 = 1
    with pytest.raises(AttributeError):
        module.set_compile_modes(jit_compile=False)
    assert options == {}


@pytest.fixture
def cuda_flags(monkeypatch, no_launcher, kernel_flags):
    """One visible CUDA device; the TF32 and cuDNN flags (settable without a GPU) are given back as they were after
    the test (conftest's kernel_flags)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("tf32, before, after", [
    ("on", (False, False), (True, True)),
    ("off", (True, True), (False, False)),
    ("auto", (False, True), (False, True)),  # left as they are, whatever they are
])
def test_tf32_sets_cudnn_and_cublas_flags(cuda_flags, tf32, before, after):
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    runtime = distributed.setup_runtime(device_args(tf32=tf32), local_rank=0)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == after
    words = {True: "on", False: "off"}
    assert runtime.kernel_settings.startswith(f"TF32 convolutions {words[after[0]]}, TF32 matmuls {words[after[1]]}"
                                              + (" (PyTorch's default)" if tf32 == "auto" else ",")), runtime
    assert "cuDNN autotuning on" in runtime.kernel_settings


def test_deterministic_turns_cudnn_autotuning_off_and_deterministic_kernels_on(cuda_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so that undo removes what the code sets
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    runtime = distributed.setup_runtime(device_args(deterministic=True), local_rank=0)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert runtime.kernel_settings.endswith("cuDNN autotuning off, deterministic algorithms (--deterministic)")


def test_npu_flags_on_a_gpu_are_noted_as_ignored(cuda_flags):
    runtime = distributed.setup_runtime(device_args(npu_jit_compile="off", npu_internal_format="on"), local_rank=0)
    assert runtime.kernel_settings.endswith(
        "(--npu-jit-compile off, --npu-internal-format on: not for cuda runs, ignored)")


def test_cpu_run_logs_its_kernel_settings(image_folder, tmp_path):
    """The start-up log names the settings; flags for NPUs and GPUs are accepted and noted (--hf32 is --tf32)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    run_main_in_process(image_folder, *tiny_flags(tmp_path, "--epochs", "1", "--max-steps", "1", "--no-val",
                                                  "--no-checkpoint", "--npu-jit-compile", "off", "--hf32", "on"))
    lines = [line for line in (tmp_path / "train.log").read_text().splitlines() if "=> kernel settings:" in line]
    assert len(lines) == 1
    assert lines[0].endswith("=> kernel settings: none apply on the CPU (--npu-jit-compile off, --tf32 on: not for "
                             "cpu runs, ignored)")
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


# --- tools/onnx_to_om.py: ATC commands for Ascend offline inference ---

SOC = "Ascend910B3"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """export_onnx.py's file for a 3-class mnasnet0_5 at 64 px (random weights)."""
    torch.manual_seed(0)
    model = mnasnet.ARCHS["mnasnet0_5"](num_classes=3).eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx.export(model, str(path), image_size=64)
    return path


def one_node_model(path, name, dims):
    """An ONNX file whose one input ``name`` has shape ``dims`` (an int, or a string for a dynamic axis)."""
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", [name], ["output"])], "g",
                                   [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)],
                                   [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, dims)])
    onnx.save(onnx.helper.make_model(graph), str(path))
    return str(path)


def expected_command(onnx_path, prefix, batch):
    return ["atc", f"--model={onnx_path}", "--framework=5", f"--output={prefix}_bs{batch}", "--input_format=NCHW",
            f"--input_shape=input:{batch},3,64,64", f"--soc_version={SOC}", "--log=error"]


def test_prints_the_atc_command_for_each_batch_size_without_cann(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no atc
    onnx_to_om.main([str(exported), "--soc-version", SOC, "--batch-sizes", "1,16,64"])
    out, err = capsys.readouterr()
    prefix = os.path.join(os.path.dirname(exported), "tiny")
    assert [shlex.split(line) for line in out.splitlines()] == [expected_command(exported, prefix, batch)
                                                                 for batch in (1, 16, 64)]
    assert "atc is not on PATH" in err


@pytest.mark.parametrize("name, dims, argv, fragment", [
    ("images", ["batch", 3, 64, 64], [], "the model's inputs are ['images'], expected one named 'input'"),
    ("input", ["batch", 64, 64, 3], [], "input 'input' has shape (?,64,64,3), expected (batch,3,H,W)"),
    ("input", ["batch", 3, "height", "width"], [], "has shape (?,3,?,?), expected (batch,3,H,W) with H and W fixed"),
    ("input", [4, 3, 64, 64], ["--batch-sizes", "4,16"], "fixed at 4 in the file, so it cannot be converted for "
                                                         "batch size(s) [16]"),
    ("input", ["batch", 3, 64, 64], ["--batch-sizes", "0,16"], "--batch-sizes must list distinct positive integers"),
    ("input", ["batch", 3, 64, 64], ["--soc-version", "910B3"], "--soc-version '910B3' is not a chip name"),
])
def test_a_file_or_flag_that_does_not_fit_is_one_line(tmp_path, capsys, name, dims, argv, fragment):
    path = one_node_model(tmp_path / "model.onnx", name, dims)
    with pytest.raises(SystemExit) as exit_info:
        onnx_to_om.main([path, "--soc-version", SOC, *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err


def test_a_fixed_batch_file_converts_at_its_own_batch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    path = one_node_model(tmp_path / "model.onnx", "input", [4, 3, 64, 64])
    onnx_to_om.main([path, "--soc-version", SOC, "--batch-sizes", "4", "--output-dir", "om"])
    assert shlex.split(capsys.readouterr().out) == expected_command(path, os.path.join("om", "model"), 4)


def fake_atc(folder, exit_status=0):
    """An ``atc`` that records each call's arguments (one per line, then ---) in folder/atc.log."""
    script = folder / "atc"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" --- >> "{folder}/atc.log"\nexit {exit_status}\n')
    script.chmod(0o755)
    return folder / "atc.log"


def atc_calls(log):
    """The argument lists fake_atc recorded, one per call."""
    return [call.splitlines() for call in log.read_text().split("---\n")[:-1]]


def test_runs_atc_where_it_is_installed(exported, tmp_path):
    """Through tools/onnx_to_om.sh, from another directory with a relative path: CANN's environment is looked
    for (test/env_npu.sh), and the atc on PATH runs once per batch size with the printed arguments."""
    (tmp_path / "bin").mkdir()
    log = fake_atc(tmp_path / "bin")
    shutil.copy(exported, tmp_path / "tiny.onnx")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND")}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    env["PYTHON"] = sys.executable
    result = subprocess.run([os.path.join(ROOT, "tools", "onnx_to_om.sh"), "tiny.onnx", "--soc-version", SOC,
                             "--batch-sizes", "2,8", "--output-dir", "om"], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = [expected_command("tiny.onnx", os.path.join("om", "tiny"), batch)[1:] for batch in (2, 8)]
    assert atc_calls(log) == expected
    assert [shlex.split(line)[1:] for line in result.stdout.splitlines()] == expected
    assert (tmp_path / "om").is_dir()


def test_a_failing_atc_is_one_line(exported, tmp_path, capsys, monkeypatch):
    fake_atc(tmp_path, exit_status=3)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        onnx_to_om.main([str(exported), "--soc-version", SOC, "--batch-sizes", "1,16"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: atc failed (exit status 3) for batch size 1: see its messages "
                                               "above")
    assert len(atc_calls(tmp_path / "atc.log")) == 1
