"""Kernel settings (--npu-jit-compile, --npu-internal-format, --tf32), set in device.setup_runtime and logged; and
tools/onnx_to_om.py, which turns export_onnx.py's file into ATC commands for Ascend offline inference."""
import pytest
import torch

import device
from conftest import tiny_flags
from standins.npu_settings import npu_module
from test_device_setup import device_args, no_launcher  # noqa: F401  (a fixture)
from test_main import run_main

CHIP_DEFAULT = "torch_npu's default for this chip"


@pytest.fixture
def fake_npu(monkeypatch, no_launcher):  # noqa: F811
    """torch.npu as torch_npu 2.14.0 makes it, for kernel settings (tests/standins/npu_settings.py)."""
    torch.utils.rename_privateuse1_backend("npu")  # what torch_npu does, so torch.device("npu", 0) parses

    def install(binary_by_default):
        module, options, bound = npu_module(binary_by_default)
        monkeypatch.setattr(torch, "npu", module, raising=False)
        monkeypatch.setattr(device, "_import_torch_npu", lambda: True)
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
    set_options, bound = fake_npu(binary_by_default)
    runtime = device.setup_runtime(device_args(device_kind="npu", **flags), local_rank=0)
    assert bound == [torch.device("npu", 0)]
    assert set_options == options
    assert runtime.kernel_settings == described


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
def cuda_flags(monkeypatch, no_launcher):  # noqa: F811
    """One visible CUDA device; the TF32 and cuDNN flags (plain attributes of torch.backends, settable without a
    GPU) are given back as they were after the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for module, name in ((torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32"),
                         (torch.backends.cudnn, "benchmark")):
        monkeypatch.setattr(module, name, getattr(module, name))


@pytest.mark.parametrize("tf32, before, after", [
    ("on", (False, False), (True, True)),
    ("off", (True, True), (False, False)),
    ("auto", (False, True), (False, True)),  # left as they are, whatever they are
])
def test_tf32_sets_cudnn_and_cublas_flags(cuda_flags, tf32, before, after):
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    runtime = device.setup_runtime(device_args(tf32=tf32), local_rank=0)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == after
    words = {True: "on", False: "off"}
    assert runtime.kernel_settings.startswith(f"TF32 convolutions {words[after[0]]}, TF32 matmuls {words[after[1]]}"
                                              + (" (PyTorch's default)" if tf32 == "auto" else ",")), runtime
    assert "cuDNN autotuning on" in runtime.kernel_settings


def test_npu_flags_on_a_gpu_are_noted_as_ignored(cuda_flags):
    runtime = device.setup_runtime(device_args(npu_jit_compile="off", npu_internal_format="on"), local_rank=0)
    assert runtime.kernel_settings.endswith(
        "(--npu-jit-compile off, --npu-internal-format on: not for cuda runs, ignored)")


def test_cpu_run_logs_its_kernel_settings(image_folder, tmp_path):
    """The start-up log names the settings; flags for NPUs and GPUs are accepted and noted (--hf32 is --tf32)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    run_main(image_folder, *tiny_flags(tmp_path, "--epochs", "1", "--max-steps", "1", "--no-val", "--no-checkpoint",
                                       "--npu-jit-compile", "off", "--hf32", "on"))
    lines = [line for line in (tmp_path / "train.log").read_text().splitlines() if "=> kernel settings:" in line]
    assert len(lines) == 1
    assert lines[0].endswith("=> kernel settings: none apply on the CPU (--npu-jit-compile off, --tf32 on: not for "
                             "cpu runs, ignored)")
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
