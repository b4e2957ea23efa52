"""tools/device_check.py (run on the CPU) and tools/onnx_to_om.py (ATC commands for Ascend offline inference)."""
import os
import shlex
import shutil
import subprocess
import sys
import time

import onnx
import pytest
import torch

import device_check
import export_onnx
import mnasnet
import onnx_to_om
from helpers import ROOT


def _device_check(*flags, env=None):
    return subprocess.run([os.path.join(ROOT, "tools", "device_check.sh"), "--device", "cpu", "--quick", *flags],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_device_check_runs_on_the_cpu_and_passes():
    """tools/device_check.sh in miniature: every check runs, fp16 overflow included (torch's GradScaler on the
    CPU), and passes; what needs 2 processes or bench.py's time says SKIP, naming itself."""
    done = _device_check()
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for name in ("amp-training", "overflow-dynamic", "resume", "overflow-fixed", "jpeg-pipeline", "eval",
                 "eval-compile"):
        assert any(line.startswith(f"PASS {name}:") for line in lines), done.stdout
    for name in ("ddp", "sigterm-workers", "sharded-eval", "per-rank-logs", "bench", "bench-e2e"):
        assert any(line.startswith(f"SKIP {name}:") for line in lines), done.stdout
    assert "resumed: bit-identical" in done.stdout and lines[1].startswith("plan: amp-training ~")
    assert not any(line.startswith("FAIL") for line in lines), done.stdout


NEVER_SKIPS = """
import torch

_unscale = torch.amp.GradScaler._unscale_grads_


def _never_finds_inf(self, *args, **kwargs):
    found = _unscale(self, *args, **kwargs)
    for flag in found.values():
        flag.zero_()
    return found


torch.amp.GradScaler._unscale_grads_ = _never_finds_inf
"""


def test_device_check_fails_the_overflow_checks_against_a_scaler_that_never_skips(tmp_path):
    """A broken build: the loss scaler applies every step, overflowing ones too (sitecustomize patches it into
    main.py's processes)."""
    (tmp_path / "sitecustomize.py").write_text(NEVER_SKIPS)
    done = _device_check("--checks", "overflow-dynamic,overflow-fixed", env={"PYTHONPATH": str(tmp_path)})
    lines = done.stdout.splitlines()
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert [line.split(":")[0] for line in lines if line.startswith(("PASS", "FAIL"))] == [
        "FAIL overflow-dynamic", "FAIL overflow-fixed"], done.stdout


def test_device_check_budget_spends_itself_on_the_most_important_checks(capsys):
    sizes = device_check.settings(device_check.parse_args(["--device", "cuda"]), "cuda", 1)
    for budget in (480, 150):
        planned, dropped = device_check.plan_checks(device_check.CHECKS, "cuda", sizes, budget)
        kept = [name for name, _ in planned]
        assert kept == [name for name in device_check.CHECKS if name in kept] and kept[0] == "amp-training"
        assert sum(seconds for _, seconds in planned) <= budget and dropped
        for name, _ in dropped:  # did not fit beside the more important checks
            before = device_check.CHECKS.index(name)
            spent = sum(seconds for kept_name, seconds in planned if device_check.CHECKS.index(kept_name) < before)
            assert spent + device_check.estimate_seconds(name, "cuda", sizes) > budget
    # A budget that nothing fits: every check says SKIP, nothing runs, nothing fails.
    assert device_check.main(["--device", "cpu", "--quick", "--budget-s", "1"], started=time.time()) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if line.startswith("SKIP ")]) == len(device_check.CHECKS), out


def test_device_check_sizes_bench_so_that_its_main_py_runs_measure_steps():
    for kind in ("cpu", "cuda"):
        bench = device_check.settings(device_check.parse_args(["--device", kind]), kind, 8)["bench"]
        assert device_check.bench_e2e_images(bench) // bench["train_batch"] > device_check.BENCH_WARMUP_STEPS


def test_device_check_compile_check_needs_a_c_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert device_check.compiler_missing("cuda").startswith("no C compiler")


def test_device_check_comparisons_print_fail_on_broken_results(capsys):
    weights = {"w": torch.ones(3), "n": torch.tensor(5)}
    report = device_check.Report()
    drifted = device_check.weights_difference(weights, {"w": torch.tensor([1.0, 1.0, 1.01]), "n": torch.tensor(5)})
    report.check("resume", *device_check.resume_verdict(drifted))  # not bit-identical, no rerun measured
    report.check("resume", *device_check.resume_verdict(drifted, rerun=(True, 0.0)))  # the code repeats itself
    report.check("resume", *device_check.resume_verdict(
        device_check.weights_difference(weights, {"w": torch.ones(3), "n": torch.tensor(6)})))
    report.check("overflow", *device_check.weights_finite({"w": torch.tensor([1.0, float("nan")])}))
    report.check("amp-training", *device_check.loss_fell([{"train_loss": 6.9}, {"train_loss": 7.0}]))
    evaluated = {"val_images": 100, "val_acc1": 50.0, "val_acc5": 90.0, "val_loss": 1.0}
    for changed in ({"val_acc1": 52.0}, {"val_loss": 1.01}):
        report.check("eval", *device_check.evaluations_agree({"eager": evaluated, "compile": {**evaluated, **changed}}))
    scale = device_check.OVERFLOW_LOSS_SCALE
    all_skipped = {"skipped_steps": 8, "train_steps": 8, "train_loss": 7.0}
    report.check("overflow-dynamic", *device_check.dynamic_overflow_verdict(all_skipped, scale / 2 ** 8))
    report.check("overflow-dynamic", *device_check.dynamic_overflow_verdict({**all_skipped, "skipped_steps": 0},
                                                                            scale))
    report.check("overflow-fixed", *device_check.fixed_overflow_verdict(all_skipped, scale / 2 ** 8))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 10 and all(line.startswith("FAIL ") for line in out) and report.failed, out
    # and what agrees passes: within one image, within the tolerance; a drift no larger than the code's own
    assert device_check.evaluations_agree({"a": evaluated, "b": {**evaluated, "val_acc1": 51.0,
                                                                 "val_loss": 1.0005}})[0]
    assert device_check.resume_verdict(drifted, rerun=drifted)[0]
    assert device_check.dynamic_overflow_verdict({**all_skipped, "skipped_steps": 3}, scale / 2 ** 3)[0]
    assert device_check.fixed_overflow_verdict(all_skipped, scale)[0]


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
