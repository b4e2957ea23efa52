"""training/meters.py: the step breakdown, the data wait share over the measured steps only, and the slow-loader
warning."""
import csv
import logging
import time
import types

import pytest
import torch

from helpers import run_main_in_process, tiny_flags
from training import data, meters


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


def test_a_mid_epoch_save_stays_out_of_the_step_times_and_their_split(monkeypatch):
    """A step waits 0.1 s for its batch and computes for 1 s; a 30 s save after step 2 (engine.train_one_epoch's
    --save-every-minutes) is left out of the printed times, the FPS window and the data/copy/compute split."""
    clock = [0.0]
    monkeypatch.setattr(meters.time, "perf_counter", lambda: clock[0])
    runtime = types.SimpleNamespace(device=torch.device("cpu"))
    progress = meters.EpochProgress(runtime, types.SimpleNamespace(copy_seconds=0.0), 0, 4, 0)
    progress.start(0)
    loss, output, labels = torch.tensor(1.0), torch.zeros(2, 10), torch.zeros(2, dtype=torch.long)
    for step in range(4):
        clock[0] += 0.1
        progress.batch_arrived()
        clock[0] += 1.0
        progress.step_done(loss, output, labels, 1)
        progress.log_line(logging.getLogger("test"), step, meters.SkippedSteps())
        if step == 1:
            clock[0] += 30.0
            progress.leave_out(30.0)
        progress.step_end()
    assert progress.breakdown.steps == 4
    assert progress.breakdown.means_ms() == pytest.approx({"data_ms": 100.0, "copy_ms": 0.0, "compute_ms": 1000.0})
    assert progress.step_time.mean == pytest.approx(1.1)
    throughput = meters.ThroughputMeter(0)
    progress.add_window(throughput, 4)
    assert throughput.seconds == pytest.approx(4.4)
