"""Our code under the Ascend libraries' own behaviour, through stand-ins that copy it (tests/standins/): torch_npu's
torch.load and Ascend apex master's zero_grad; and how an NPU host installs them."""
import argparse
import re
import zipfile

import pytest
import torch

import main
from helpers import ROOT, run_main_in_process, tiny_flags
from standins import apex_amp, npu_serialization
from training import checkpoint, devices
from training.utils import UserError

LOADS = {"torch": torch.load, "torch_npu": npu_serialization.load}


def _record(path, suffix):
    with zipfile.ZipFile(path) as archive:
        return next(info for info in archive.infolist() if info.filename.endswith(suffix))


def _overwrite(path, offset, content):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(content)


def _record_header_overwritten(path):
    """The archive opens; its first tensor record does not (a RuntimeError inside torch's _load)."""
    _overwrite(path, _record(path, "/data/0").header_offset, b"XXXX")
    return "PytorchStreamReader failed reading file data/0"


def _pickle_overwritten(path):
    """The pickle stream's bytes after its first few are garbage: the unpickler fails on them (not a RuntimeError)."""
    record = _record(path, "/data.pkl")
    _overwrite(path, record.header_offset + 30 + len(record.filename) + len(record.extra) + 8, b"\xff" * 32)
    return "data.pkl is damaged"


def _pickled_name_overwritten(path):
    """A key's UTF-8 bytes in the pickle stream are garbage: a UnicodeDecodeError."""
    with open(path, "rb") as handle:
        offset = handle.read().index(b"state_dict")
    _overwrite(path, offset, b"\xff" * len("state_dict"))
    return "data.pkl is damaged"


def _truncated(path):
    """The zip's central directory is gone: the archive does not open."""
    with open(path, "r+b") as handle:
        handle.truncate(handle.seek(0, 2) // 2)
    return "PytorchStreamReader failed reading zip archive"


def _emptied(path):
    open(path, "wb").close()
    return "EOFError"


DAMAGES = {"record header": _record_header_overwritten, "pickle": _pickle_overwritten,
           "pickled name": _pickled_name_overwritten, "truncated": _truncated, "empty": _emptied}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("load", LOADS)
def test_a_damaged_checkpoint_is_called_unreadable_under_either_torch_load(load, damage, tmp_path, monkeypatch):
    """One line saying the file cannot be read. torch_npu's torch.load re-raises a record's read error as an
    UnpicklingError, which read 'refusing to load ... pickled objects'."""
    path = tmp_path / "damaged.pth"
    torch.save({"state_dict": {"weight": torch.ones(3)}}, path)
    said = DAMAGES[damage](path)
    monkeypatch.setattr(torch, "load", LOADS[load])
    with pytest.raises(UserError) as error:
        checkpoint.load_file(str(path))
    message = str(error.value)
    assert message.startswith(f"cannot read checkpoint {path}: ") and said in message, message
    assert "pickled" not in message and "\n" not in message


@pytest.mark.parametrize("load", LOADS)
def test_pickled_objects_are_refused_under_either_torch_load(load, tmp_path, monkeypatch):
    path = tmp_path / "pickled.pth"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    monkeypatch.setattr(torch, "load", LOADS[load])
    with pytest.raises(UserError, match="it holds pickled objects") as error:
        checkpoint.load_file(str(path))
    assert "argparse.Namespace" in str(error.value)


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


# --- installing on an NPU host ---

CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("page", ["requirements-npu.txt", "docs/devices.md"])
def test_the_npu_install_takes_torchs_cpu_build_at_the_pinned_versions(page):
    """PyPI's torch Linux wheels are CUDA builds with gigabytes of NVIDIA packages; torch_npu's README installs the
    CPU build from PyTorch's index first. The command must name requirements-npu.txt's own pins."""
    with open(f"{ROOT}/requirements-npu.txt") as handle:
        pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", handle.read(), re.M))
    with open(f"{ROOT}/{page}") as handle:
        commands = [line for line in handle.read().splitlines() if CPU_INDEX in line]
    assert commands, f"{page} does not say how to install torch's CPU build"
    for command in commands:
        assert f"pip install torch=={pins['torch']} torchvision=={pins['torchvision']} {CPU_INDEX}" in command
        assert command.endswith("&& pip install -r requirements-npu.txt")
