"""--profile: a window of training steps in a trace per rank, and rank 0's top operators."""
import json
import logging

import pytest

import main
from helpers import run_main_in_process, tiny_flags
from standins import npu_profiler
from training import profiling


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
