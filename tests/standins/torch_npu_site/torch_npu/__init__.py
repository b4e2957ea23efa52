"""Stand-in for the torch_npu 2.14.0 wheel, for tests that put this folder on PYTHONPATH.

Mirrors the wheel's loading behaviour (torch_npu-2.14.0.dist-info/entry_points.txt: ``[torch.backends]
torch_npu = torch_npu:_autoload``, so ``import torch`` imports this package; torch_npu/__init__.py: autoloading
switched off while it imports torch, ``_autoload()`` restores the switch). Without CANN's environment the real
package fails in torch_npu/_init/core/module_loader.py ``_initialize_c_extension_children``, where importing
torch_npu._C cannot find libhccl.so; this one raises that ImportError unless ASCEND_HOME_PATH, which CANN's
set_env.sh exports, is set. With it, it registers a device module as torch_npu's registry_manager does
(``rename_privateuse1_backend("npu")``, ``torch._register_device_module``) that sees $FAKE_NPU_COUNT devices
(default 1) and appends "import <pid>" and "set_device <index> <pid>" lines to $FAKE_NPU_LOG when it is set.
"""
import os
import types

ORG_AUTOLOAD = os.getenv("TORCH_DEVICE_BACKEND_AUTOLOAD", "1")
os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"

import torch  # noqa: E402


def _log(line):
    if os.environ.get("FAKE_NPU_LOG"):
        with open(os.environ["FAKE_NPU_LOG"], "a") as handle:
            handle.write(f"{line} {os.getpid()}\n")


if not os.environ.get("ASCEND_HOME_PATH"):
    raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")


def _set_device(device):
    _log(f"set_device {torch.device(device).index}")


npu = types.ModuleType("torch.npu")
npu.is_available = lambda: True
npu.device_count = lambda: int(os.environ.get("FAKE_NPU_COUNT", "1"))
npu.set_device = _set_device
torch.utils.rename_privateuse1_backend("npu")
torch._register_device_module("npu", npu)
_log("import")


def _autoload():
    os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = ORG_AUTOLOAD
