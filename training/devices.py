"""Which device a run uses and how its kernels are set: the device kind (npu, cuda, cpu), the torch_npu
import, device lists and counts, the memory format, and the cuDNN / TF32 / determinism / NPU kernel switches.

Everything that differs between Ascend NPUs (torch_npu), NVIDIA GPUs (CUDA) and the CPU about the device itself
is decided here; distributed.py and precision.py build on it.
"""
import importlib
import os
import sys

import torch

from training.utils import UserError, first_line

CANN_HINT = ("source CANN's set_env.sh first (/usr/local/Ascend/cann/set_env.sh, or ascend-toolkit/set_env.sh "
             "before CANN 8.5; test/env_npu.sh finds it)")


def import_torch_npu():
    """Import torch_npu (only ever imported here), which registers torch.npu; False when it is not installed.

    torch's autoloading is off (training/autoload_off.py), so every process of an NPU run comes here, spawned
    workers too.
    An installed torch_npu that cannot load raises UserError with its reason: without CANN's environment its
    extension finds no libhccl.so / libascendcl.so (ImportError, torch_npu/_init/core/module_loader.py); it
    raises RuntimeError next to another accelerator (torch_npu/__init__.py) and Exception when ASCEND_HOME_PATH
    names no CANN (torch_npu/_init/registry/registry_manager.py).
    """
    try:
        importlib.import_module("torch_npu")
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "torch_npu":
            return False
        raise UserError(f"torch_npu cannot be loaded ({first_line(exc)})") from None
    return True


def _npu_available():
    """Whether torch_npu loads and sees a device; raises UserError when it is installed but cannot load."""
    return import_torch_npu() and torch.npu.is_available() and torch.npu.device_count() > 0


def resolve_device_kind(requested):
    """Map --device to 'npu', 'cuda' or 'cpu', checking that the device is really there. Only 'npu' and 'auto'
    touch torch_npu: a CPU or GPU run does not depend on it."""
    requested = "cuda" if requested == "gpu" else requested
    if requested == "auto":
        fallback = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            if _npu_available():
                return "npu"
        except UserError as exc:
            print(f"note: --device auto: {exc}; running on {fallback}. For the NPU, {CANN_HINT}", file=sys.stderr)
        return fallback
    if requested == "npu":
        try:
            installed = import_torch_npu()
        except UserError as exc:
            raise UserError(f"--device npu: {exc}; {CANN_HINT}") from None
        if not installed:
            raise UserError("--device npu: torch_npu is not installed: pip install -r requirements-npu.txt, then "
                            + CANN_HINT)
        if not (torch.npu.is_available() and torch.npu.device_count() > 0):
            raise UserError("--device npu: torch_npu is installed but sees no NPU")
    elif requested == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA GPU is visible to PyTorch")
    return requested


def device_module(kind):
    """torch.npu / torch.cuda, which share the same API; None for the CPU."""
    return getattr(torch, kind) if kind in ("npu", "cuda") else None


def device_count(kind):
    return device_module(kind).device_count() if kind != "cpu" else os.cpu_count() or 1


def parse_device_list(text, kind):
    """'0,1,2' -> [0, 1, 2], each checked against the devices present."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise UserError(f"--device-list must be comma-separated integers, got {text!r}") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise UserError(f"--device-list must list distinct non-negative device ids, got {text!r}")
    if kind != "cpu":
        present = device_count(kind)
        missing = [i for i in ids if i >= present]
        if missing:
            raise UserError(f"--device-list asks for {kind} device(s) {missing}, but only {present} are present")
    return ids


# --npu-jit-compile, --npu-internal-format and --tf32: "auto" leaves the library's own default.
SWITCHES = {"on": True, "off": False}


NPU_SETTINGS = ("npu_jit_compile", "npu_internal_format")


def apply_kernel_settings(kind, args):
    """Set this process's kernel options (every spawned worker sets its own, where Ascend asks for
    set_compile_mode to be called); returns the settings in effect, for the start-up log.

    NPU (torch_npu 2.14.0, torch_npu/npu/npu_config.py, exposed as torch.npu.* by torch_npu/npu/__init__.py):
    ``set_compile_mode(jit_compile=...)`` chooses online compilation (True) or prebuilt binary kernels (False:
    first steps take seconds instead of minutes); Ascend documents True as the default on Atlas training and
    inference series chips, False on Atlas A2/A3. ``config.allow_internal_format`` lets operators keep tensors in
    the NPU's private layouts (NC1HWC0, FRACTAL_Z); its default is per chip too (off on A3) and torch_npu has no
    getter for it. ``conv.allow_hf32`` / ``matmul.allow_hf32``, the NPU's TF32, default to True / False.
    CUDA: ``torch.backends.cudnn.allow_tf32`` / ``torch.backends.cuda.matmul.allow_tf32`` default to True / False,
    the same split. --tf32 sets both pairs: one switch, so that NPU and GPU runs compare like for like.
    """
    if kind == "npu":
        described = _apply_npu_settings(args)
    elif kind == "cuda":
        if args.tf32 != "auto":
            torch.backends.cudnn.allow_tf32 = SWITCHES[args.tf32]
            torch.backends.cuda.matmul.allow_tf32 = SWITCHES[args.tf32]
        tf32_default = _by_default(args.tf32, "PyTorch's default")
        described = (f"TF32 convolutions {_on_off(torch.backends.cudnn.allow_tf32)}, TF32 matmuls "
                     f"{_on_off(torch.backends.cuda.matmul.allow_tf32)}{tf32_default}, "
                     f"cuDNN autotuning {_on_off(torch.backends.cudnn.benchmark)}")
    else:
        described = "none apply on the CPU"
    if args.deterministic:
        described += ", " + _use_deterministic_algorithms(kind)
    other_kinds = (NPU_SETTINGS if kind != "npu" else ()) + (("tf32",) if kind == "cpu" else ())
    ignored = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in other_kinds
               if getattr(args, name) != "auto"]
    if ignored:
        described += f" ({', '.join(ignored)}: not for {kind} runs, ignored)"
    return described


def _apply_npu_settings(args):
    npu = torch.npu
    if args.npu_jit_compile != "auto":
        npu.set_compile_mode(jit_compile=SWITCHES[args.npu_jit_compile])
    if args.npu_internal_format != "auto":
        npu.config.allow_internal_format = SWITCHES[args.npu_internal_format]
    if args.tf32 != "auto":
        npu.conv.allow_hf32 = SWITCHES[args.tf32]
        npu.matmul.allow_hf32 = SWITCHES[args.tf32]
    chip_default = "torch_npu's default for this chip"
    kernels = "binary kernels" if npu.is_jit_compile_false() else "online-compiled kernels (jit_compile)"
    formats = chip_default if args.npu_internal_format == "auto" else args.npu_internal_format
    hf32_default = _by_default(args.tf32, "torch_npu's default")
    return (f"{kernels}{_by_default(args.npu_jit_compile, chip_default)}, internal formats {formats}, "
            f"HF32 convolutions {_on_off(npu.conv.allow_hf32)}, HF32 matmuls {_on_off(npu.matmul.allow_hf32)}"
            f"{hf32_default}")


def _use_deterministic_algorithms(kind):
    """--deterministic: kernels that give the same bits on every run. Operators without a deterministic kernel warn
    (warn_only) rather than stop a run. cuBLAS needs a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when its
    handle is made, i.e. after this), HCCL's reductions their own switch (HCCL_DETERMINISTIC, read at the process
    group's start); a variable the user set wins."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    if kind == "cuda":
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif kind == "npu":
        os.environ.setdefault("HCCL_DETERMINISTIC", "true")
    return "deterministic algorithms (--deterministic)"


def _on_off(flag):
    return "on" if flag else "off"


def _by_default(choice, default):
    """Says whose default a setting left at "auto" is."""
    return f" ({default})" if choice == "auto" else ""


def memory_format(choice, kind):
    # Ascend recommends contiguous NCHW tensors on NPU; channels_last is faster for these convolutions elsewhere.
    if choice == "auto":
        choice = "contiguous" if kind == "npu" else "channels_last"
    return torch.channels_last if choice == "channels_last" else torch.contiguous_format
