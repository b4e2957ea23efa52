"""--profile (a window of training steps in a trace per rank, rank 0's top operators) and the per-epoch step
breakdown (data_ms, copy_ms, compute_ms) in metrics.csv, TensorBoard, the summary JSON and the launchers."""
import csv
import json
import logging
import time

import pytest

import main
from helpers import launch, run_main_in_process, tiny_flags
from standins import npu_profiler
from training import data, meters, profiling


def run_error(capsys, *argv):
    with pytest.raises(SystemExit) as stopped:
        main.main(list(argv))
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_profile_writes_a_trace_and_trains_the_same_weights(image_folder, tmp_path):
    # 36 images, batch 8: 4 steps an epoch; the window (skip 1, warm up 1, record 2) is all of the first.
    flags = [image_folder, "--epochs", "2", "--seed", "3"]
    plain = run_main_in_process(*tiny_flags(tmp_path / "plain"), *flags)
    profiled = run_main_in_process(*tiny_flags(tmp_path / "profiled"), *flags, "--profile", "--profile-steps", "1,1,2")
    assert profiled["weights_sha256"] == plain["weights_sha256"]
    assert profiled["train_loss"] == plain["train_loss"]

    traces = list((tmp_path / "profiled" / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    trace = json.loads(traces[0].read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    # Our model's convolutions, in the recorded steps 3 and 4 only (schedule step numbers 2 and 3).
    assert any("convolution" in name for name in names if name)
    assert {name for name in names if name and name.startswith("ProfilerStep#")} == {"ProfilerStep#2",
                                                                                     "ProfilerStep#3"}
    log = (tmp_path / "profiled" / "train.log").read_text()
    assert "=> profiled training steps 3-4" in log
    table = log[log.index("operators by self time"):]
    assert "Self CPU" in table and "aten::" in table and "convolution" in table
    assert "top 15 operators" not in (tmp_path / "plain" / "train.log").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--profile", "--profile-steps", "1,2"], "three integers WAIT,WARMUP,ACTIVE"),
    (["--profile", "--profile-steps", "1,1,0"], "ACTIVE at least 1"),
    (["--profile-steps", "1,1,1"], "add --profile"),
    (["--profile", "--profile-steps", "2,2,2"], "needs 6 training steps, but the first epoch has 4"),
])
def test_profile_window_errors(image_folder, tmp_path, capsys, extra, message):
    err = run_error(capsys, *tiny_flags(tmp_path), image_folder, "--epochs", "1", *extra)
    assert message in err


def test_profile_refused_with_evaluate(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    err = run_error(capsys, *tiny_flags(tmp_path), "--dummy", "-e", "--pretrained", str(weights), "--profile")
    assert "--profile records training steps" in err


def test_npu_branch_uses_torch_npu_profiler(monkeypatch, tmp_path, caplog):
    stand_in = npu_profiler.install(monkeypatch)
    window = profiling.WindowProfiler("npu", str(tmp_path), 3, 1, 1, 2)
    made = stand_in.PROFILES[-1]
    assert made.activities == [stand_in.ProfilerActivity.CPU, stand_in.ProfilerActivity.NPU]
    assert made.experimental_config.profiler_level == stand_in.ProfilerLevel.Level1
    assert made.on_trace_ready.dir_name == str(tmp_path / "profile")
    assert made.on_trace_ready.worker_name == "rank3"
    assert [made.schedule(step).name for step in range(5)] == ["NONE", "WARMUP", "RECORD", "RECORD_AND_SAVE",
                                                               "NONE"]
    for _ in range(sum(window.window)):  # wait + warmup + active
        window.step()
    assert made.saved_at_step == 4
    log = logging.getLogger("test_npu_profiler")
    with caplog.at_level(logging.INFO, logger="test_npu_profiler"):
        window.finish(log, is_main=True)
    assert made.stopped
    tables = list(tmp_path.glob("profile/rank3_*_ascend_pt/ASCEND_PROFILER_OUTPUT/operator_details.csv"))
    assert len(tables) == 1 and f"see {tables[0]}" in caplog.text


def test_profiler_kit_per_device():
    import torch
    assert profiling.profiler_kit("cpu").activities == [torch.profiler.ProfilerActivity.CPU]
    cuda = profiling.profiler_kit("cuda")
    assert cuda.module is torch.profiler and torch.profiler.ProfilerActivity.CUDA in cuda.activities
    assert cuda.sort_by == "self_device_time_total"


def test_step_breakdown_adds_up_to_the_step_time(image_folder, tmp_path):
    out = tmp_path / "run"
    summary = run_main_in_process(*tiny_flags(out), image_folder, "--epochs", "2", "--fps-warmup-steps", "0",
                                  "--tensorboard")
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for row in rows:
        assert all(float(row[key]) > 0 for key in ("data_ms", "copy_ms", "compute_ms")), row
    parts = summary["data_ms"] + summary["copy_ms"] + summary["compute_ms"]
    # The whole-run step time the FPS is measured with (no warm-up steps left out here).
    assert parts == pytest.approx(summary["step_time_ms"], rel=0.10)
    assert summary["data_wait_share"] == pytest.approx(summary["data_ms"] / parts)
    assert [set(h) >= {"data_ms", "copy_ms", "compute_ms"} for h in summary["history"]] == [True, True]
    last = summary["history"][-1]
    assert (f"=> epoch 1 mean step {last['data_ms'] + last['copy_ms'] + last['compute_ms']:.1f} ms: data wait "
            f"{last['data_ms']:.1f}, host-to-device {last['copy_ms']:.1f}") in (out / "train.log").read_text()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("data_ms", "copy_ms", "compute_ms"):
        assert [scalar.step for scalar in events.Scalars(key)] == [0, 1]


def test_slow_loader_is_reported_once(tmp_path, monkeypatch):
    original = data.SyntheticImages.__getitem__

    def slow(self, index):
        time.sleep(0.05)  # far longer than a 48 px mnasnet0_5 step of batch 2
        return original(self, index)

    monkeypatch.setattr(data.SyntheticImages, "__getitem__", slow)
    out = tmp_path / "run"
    summary = run_main_in_process(*tiny_flags(out), "--dummy", "--dummy-images", "8", "-b", "2", "--epochs", "2",
                                  "--max-steps", "2", "--no-val")
    assert summary["data_wait_share"] > meters.StepBreakdown.SLOW_LOADER_SHARE
    log = (out / "train.log").read_text()
    assert log.count("the data loader cannot keep up") == 1
    line = next(line for line in log.splitlines() if "cannot keep up" in line)
    assert "-j/--workers, now 0" in line and "--pipeline (now fast" in line


def test_fast_loader_says_nothing():
    breakdown = meters.StepBreakdown()
    breakdown.add(steps=10, wall_seconds=1.0, wait_seconds=0.1, copy_seconds=0.02)
    assert breakdown.slow_loader_message(4, "fast") is None
    assert breakdown.means_ms() == pytest.approx({"data_ms": 8.0, "copy_ms": 2.0, "compute_ms": 90.0})


def test_launcher_profiles_every_rank_and_reports_the_data_wait_share(tmp_path):
    result = launch("train_performance_8p.sh", "--device=cpu", "--num_devices=2", "--batch_size=4", "--steps=4",
                    "--workers=0", "--profile", f"--output_root={tmp_path}", "--", "--arch", "mnasnet0_5",
                    "--train-crop-size", "48", "--dummy-images", "32", "--profile-steps", "1,0,1", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "0"
    case = "MnasNet_for_PyTorch_bs4_2p_perf"
    fields = dict(line.split(" = ", 1) for line in (out / f"{case}.log").read_text().splitlines())
    summary = json.loads((out / f"{case}.json").read_text())
    assert float(fields["DataWaitShare"]) == pytest.approx(summary["data_wait_share"], abs=5e-4)
    assert 0 < float(fields["DataWaitShare"]) < 1
    for rank in (0, 1):
        assert len(list((out / "profile").glob(f"rank{rank}.*.pt.trace.json"))) == 1
    # The table is rank 0's alone.
    assert "operators by self time" in (out / "train_0.log").read_text()
    assert "operators by self time" not in (out / "rank1.log").read_text()


def test_data_wait_share_leaves_the_warm_up_steps_out(tmp_path, monkeypatch):
    # The loader is slow for each epoch's first two batches only (loader start-up), the --fps-warmup-steps.
    original = data.SyntheticImages.__getitem__
    served = []

    def slow_start(self, index):
        served.append(index)
        if len(served) % 12 in (1, 2, 3, 4):  # an epoch is 12 images in 6 batches: its first two batches
            time.sleep(0.25)
        return original(self, index)

    monkeypatch.setattr(data.SyntheticImages, "__getitem__", slow_start)
    out = tmp_path / "run"
    summary = run_main_in_process(*tiny_flags(out), "--dummy", "--dummy-images", "12", "-b", "2", "--epochs", "2",
                                  "--fps-warmup-steps", "2", "--no-val")
    assert summary["measured_steps"] == 8
    # One second of each epoch's wait is in its warm-up; the measured steps wait for nothing.
    assert summary["data_wait_share"] < meters.StepBreakdown.SLOW_LOADER_SHARE
    assert summary["data_ms"] < 100
    assert "cannot keep up" not in (out / "train.log").read_text()
