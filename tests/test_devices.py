"""training/devices.py: the device kind (and a torch_npu that cannot load), kernel settings (--npu-jit-compile,
--npu-internal-format, --tf32, --deterministic) through each library's own names, and their log line."""
import argparse
import os
import types

import pytest
import torch

from helpers import (BROKEN_NPU_SITE, ONE_STEP, clean_env, device_args, run_main_in_process, run_main_subprocess,
                     tiny_flags)
from standins.npu_settings import npu_module
from training import devices, distributed


def test_cudnn_benchmark_is_set_for_cuda_only(monkeypatch, kernel_flags):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    torch.backends.cudnn.benchmark = False
    fake_cuda = types.SimpleNamespace(set_device=lambda dev: None, device_count=lambda: 1)
    monkeypatch.setattr(devices, "device_module", lambda kind: fake_cuda)
    args = argparse.Namespace(device_kind="cpu", device_ids=[0], multiprocessing_distributed=False,
                              memory_format="auto", npu_jit_compile="auto", npu_internal_format="auto", tf32="auto",
                              deterministic=False)
    distributed.setup_runtime(args, 0)
    assert torch.backends.cudnn.benchmark is False
    args.device_kind = "cuda"
    assert distributed.setup_runtime(args, 0).device == torch.device("cuda", 0)
    assert torch.backends.cudnn.benchmark is True


# --- a torch_npu that cannot load (CANN's set_env.sh not sourced) ---

def test_cpu_run_does_not_depend_on_an_installed_torch_npu(tmp_path):
    result = run_main_subprocess(*ONE_STEP, "--device", "cpu", "--output-dir", str(tmp_path),
                                 env=clean_env(PYTHONPATH=BROKEN_NPU_SITE))
    assert result.returncode == 0, result.stderr
    assert "torch_npu" not in result.stderr and "libhccl" not in result.stderr


def test_device_auto_falls_back_to_the_cpu_in_one_line(tmp_path):
    result = run_main_subprocess(*ONE_STEP, "--device", "auto", "--output-dir", str(tmp_path),
                                 env=clean_env(PYTHONPATH=BROKEN_NPU_SITE))
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "torch_npu" in line]
    assert len(said) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "libhccl.so" in said[0] and "running on cpu" in said[0] and "set_env.sh" in said[0]
    assert "1 x cpu" in (tmp_path / "train.log").read_text()


def test_device_npu_without_cann_is_one_line_naming_set_env(tmp_path):
    result = run_main_subprocess(*ONE_STEP, "--device", "npu", "--output-dir", str(tmp_path),
                                 env=clean_env(PYTHONPATH=BROKEN_NPU_SITE))
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: --device npu:") and "libhccl.so" in err and "set_env.sh" in err


def test_spawned_workers_import_torch_npu_themselves(tmp_path):
    """With autoloading off, the launcher imports torch_npu to check the device, and each spawned worker (a fresh
    interpreter) must import it again before it binds its NPU. The stand-in loads where ASCEND_HOME_PATH is set
    and logs its imports and set_device calls; it has no kernels, so the run fails after that, which is expected."""
    log = tmp_path / "npu.log"
    result = run_main_subprocess(*ONE_STEP, "--device", "npu", "--multiprocessing-distributed",
                                 "--output-dir", str(tmp_path),
                                 env=clean_env(PYTHONPATH=BROKEN_NPU_SITE, ASCEND_HOME_PATH=str(tmp_path),
                                               FAKE_NPU_LOG=str(log), TORCH_DEVICE_BACKEND_AUTOLOAD="0"))
    lines = log.read_text().splitlines() if log.exists() else []
    imported = {line.split()[1] for line in lines if line.startswith("import ")}
    bound = [line.split()[1:] for line in lines if line.startswith("set_device ")]
    assert len(imported) == 2, (lines, result.stderr)  # the launcher and its one worker
    assert len(bound) == 1 and bound[0][0] == "0" and bound[0][1] in imported, (lines, result.stderr)


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
