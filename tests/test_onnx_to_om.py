"""tools/onnx_to_om.py: the ATC commands that turn export_onnx.py's file into Ascend offline models."""
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
import onnx_to_om
from helpers import ROOT

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
