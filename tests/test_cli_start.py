"""main.py's start: one-line errors for a command line, a device or an output folder that cannot work."""
import pytest
import torch

import main
from helpers import expect_error, run_main_subprocess, tiny_flags
from training import checkpoint, devices
from training.utils import UserError


def test_compile_on_npu_is_refused_naming_torch_npus_backends(monkeypatch, tmp_path):
    monkeypatch.setattr(devices, "resolve_device_kind", lambda requested: "npu")
    args = main.parse_args(["--dummy", "--compile", "--output-dir", str(tmp_path)])
    main.check_args(args)
    with pytest.raises(UserError) as error:
        main.prepare(args)
    assert "npugraph_ex" in str(error.value) and "torchair" not in str(error.value)


def test_unknown_arch(image_folder, tmp_path, capsys):
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), "-a", "resnet18"], "resnet18")


@pytest.mark.parametrize("device_name", ["npu", "cuda"])
def test_absent_device(image_folder, tmp_path, capsys, device_name):
    if device_name == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = [image_folder, *tiny_flags(tmp_path)]
    argv[argv.index("cpu")] = device_name
    expect_error(capsys, argv, f"--device {device_name}")


def test_errors_from_a_fresh_process_are_one_line(tmp_path):
    proc = run_main_subprocess(str(tmp_path / "missing"), "--device", "cpu", "--output-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


# --- disk and output folder ---

def test_too_little_free_space_is_an_error_at_start(image_folder, tmp_path, monkeypatch, capsys):
    usage = checkpoint.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=10 ** 6))
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "--epochs", "1")], "MiB free", "--no-checkpoint")
    assert "Epoch:" not in (tmp_path / "train.log").read_text()


def test_output_dir_that_cannot_be_created(image_folder, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path / "file" / "out")], "cannot create --output-dir")


def test_demo_output_dir_that_cannot_be_created(tmp_path, capsys):
    """The demo writes its data folder inside --output-dir: the same one line, not a traceback from the writing."""
    (tmp_path / "file").write_text("x")
    expect_error(capsys, ["--output-dir", str(tmp_path / "file" / "out")], "cannot create --output-dir")


# --- smaller user paths ---

@pytest.mark.parametrize("flag", ["--max-steps", "-j", "--fps-warmup-steps"])
def test_negative_counts_are_an_error(image_folder, tmp_path, capsys, flag):
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), flag, "-1"], flag.split("/")[0], "at least 0")
