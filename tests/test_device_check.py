"""tools/device_check.py, run on the CPU: every check passes on a sound build, the overflow checks fail on a broken
loss scaler, and its budget, sizes and comparisons."""
import os
import subprocess
import sys
import time

import torch

import device_check
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
