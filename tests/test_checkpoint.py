"""training/checkpoint.py: loading wrapped and damaged files under torch's and torch_npu's torch.load, refusing
pickled code, and writes that a kill cannot tear."""
import argparse
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import torch
import torchvision
from torch import nn

import mnasnet
from helpers import (NON_UNIT_ARCHS, ROOT, assert_same_state, expect_error, randomize, run_main_in_process, tiny_flags,
                     v1_checkpoint)
from standins import npu_serialization
from training import checkpoint
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


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from training import checkpoint
    real_save = torch.save

    def slow_save(obj, handle):
        real_save(obj, handle)
        print("written", flush=True)
        time.sleep(60)  # killed here: the new file is complete on disk but not yet renamed into place

    checkpoint.save_checkpoint({{"epoch": 1, "state_dict": {{"w": torch.ones(1000)}}}}, False, {out!r})
    torch.save = slow_save
    checkpoint.save_checkpoint({{"epoch": 2, "state_dict": {{"w": torch.zeros(10 ** 6)}}}}, False, {out!r})
""")


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one(image_folder, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(root=str(ROOT), out=str(tmp_path))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.kill()
    proc.wait()
    state = checkpoint.load_file(str(tmp_path / checkpoint.CHECKPOINT_NAME))
    assert state["epoch"] == 1 and torch.equal(state["state_dict"]["w"], torch.ones(1000))
    (stale,) = tmp_path.glob(".tmp-*.pth.tar")

    # The next run in that folder clears the killed write's temporary file (the checkpoint removed first: a run
    # without --resume does not start where it would replace one).
    os.remove(tmp_path / checkpoint.CHECKPOINT_NAME)
    run_main_in_process(image_folder, *tiny_flags(tmp_path, "--epochs", "1", "--max-steps", "1", "--no-val"))
    assert not stale.exists() and f"=> removed {stale}" in (tmp_path / "train.log").read_text()


# --- security ---

class _Exploit:
    def __reduce__(self):
        return os.system, (f"touch {_Exploit.marker}",)


@pytest.mark.parametrize("flag", ["--resume", "--pretrained"])
def test_a_checkpoint_that_would_run_code_is_refused(image_folder, tmp_path, capsys, flag):
    _Exploit.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": _Exploit()}, path)
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), "--evaluate", flag, str(path)],
                 f"refusing to load {path}")
    assert not _Exploit.marker.exists()


WRAPPERS = {"DataParallel": nn.DataParallel, "torch.compile": torch.compile}


# --- wrapped state dicts ---

@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("arch", NON_UNIT_ARCHS)
def test_wrapped_state_dicts_of_every_width_load(arch, wrapper, tmp_path):
    """The file keeps the wrapper's own metadata (version 1, nn.Module's default) as torch.save writes it."""
    source = randomize(mnasnet.ARCHS[arch](num_classes=5))
    path = tmp_path / "wrapped.pth"
    torch.save(WRAPPERS[wrapper](source).state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no version-1 stem may be rebuilt
        model, _ = checkpoint.load_model(str(path), arch)
    assert_same_state(model.state_dict(), source.state_dict())


def test_a_wrapped_version1_checkpoint_still_loads_as_version1(tmp_path):
    theirs = torchvision.models.mnasnet0_5()
    with pytest.warns(UserWarning):
        theirs.load_state_dict(v1_checkpoint("mnasnet0_5"))
    path = tmp_path / "wrapped_v1.pth"
    torch.save(nn.DataParallel(theirs).state_dict(), path)
    with pytest.warns(UserWarning, match="version-1"):
        model, _ = checkpoint.load_model(str(path), "mnasnet0_5")
    assert model.layers[0].out_channels == 32
    assert_same_state(model.state_dict(), theirs.state_dict())
