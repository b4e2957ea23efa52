"""Imported first by main.py, before anything imports torch: switches off torch's device-plugin autoloading.

The torch_npu wheel registers a ``torch.backends`` entry point that ``import torch`` calls; where CANN's
set_env.sh was not sourced it fails (its extension cannot find libhccl.so / libascendcl.so), and torch turns that
into a RuntimeError that ends every run, CPU and GPU ones too. With autoloading off, devices.py imports torch_npu
itself, only for a run that asks for an NPU (--device npu, or auto), where a failure is one line. Retrying a
failed ``import torch`` is no way out: the half-initialised extension cannot be imported again. Spawned workers
re-import main.py and inherit the variable; distributed.setup_runtime imports torch_npu in them for NPU runs.
"""
import os

os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
