"""main.py stopped and started again: SIGTERM, Ctrl-C, kills and periodic saves (--save-every-minutes) with exact
resume, --resume auto and the refusal to replace another run's checkpoint, the demo run again, --resume of other
files, --start-epoch, a new --lr, version-1 stems."""
import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

import main
from helpers import (ROOT, clean_env, expect_error, popen_main, run_main_in_process, run_main_subprocess, scaler_state,
                     tiny_flags, v1_checkpoint, wait_for_text, weights, without, write_image_folder)
from training import checkpoint, engine
from training.precision import Precision


def test_checkpoint_of_another_arch_or_class_count(trained, image_folder, tmp_path, capsys):
    output_dir, _ = trained
    ckpt = str(output_dir / "checkpoint.pth.tar")
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), "-a", "mnasnet0_75", "--evaluate", "--resume", ckpt],
                 "mnasnet0_5", "mnasnet0_75")
    other = torchvision.models.mnasnet0_5(num_classes=7)
    path = tmp_path / "seven.pth"
    torch.save(other.state_dict(), path)
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), "--evaluate", "--pretrained", str(path)],
                 "7 classes", "3")


def test_missing_resume_file_is_an_error(image_folder, tmp_path, capsys):
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), "--resume", str(tmp_path / "none.pth.tar")],
                 "none.pth.tar")


def test_a_cuda_checkpoint_resumes_with_this_devices_optimizer_kernels(trained, image_folder, tmp_path, monkeypatch):
    """The saved optimizer state says fused=True on CUDA; resumed elsewhere, the steps run this device's kernels."""
    output_dir, _ = trained
    state = torch.load(output_dir / "checkpoint.pth.tar", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True
    torch.save(state, tmp_path / "cuda.pth.tar")
    fused_steps = []
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        fused_steps.append(self.param_groups[0]["fused"])
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    run_main_in_process(image_folder, *tiny_flags(tmp_path / "run", "--resume", str(tmp_path / "cuda.pth.tar"),
                                                  "--epochs", str(state["epoch"] + 1), "--no-val", "--no-checkpoint"))
    assert fused_steps and not any(fused_steps)


# --- interruption and exact resume ---

# 36 training images in batches of 8: 4 steps an epoch.
RESUME_FLAGS = ("--epochs", "2", "--seed", "1", "--warmup", "1")


@pytest.fixture(scope="module")
def straight(image_folder, tmp_path_factory):
    """Two epochs (4 steps each) without interruption: the run's summary and its final weights."""
    output_dir = tmp_path_factory.mktemp("straight")
    summary = run_main_in_process(image_folder, *tiny_flags(output_dir, *RESUME_FLAGS))
    return summary, weights(output_dir / "checkpoint.pth.tar")


def _signal_self_at(monkeypatch, obj, name, when):
    original = getattr(obj, name)
    calls = []

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(1)
        if when(len(calls), args):
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    monkeypatch.setattr(obj, name, wrapped)


@pytest.mark.parametrize("where", ["mid-epoch", "end of training", "epoch boundary"])
def test_sigterm_then_resume_ends_with_identical_weights(image_folder, straight, tmp_path, monkeypatch, where):
    """SIGTERM at step 6 of 8, after the last step of epoch 0 (before validation), or after epoch 0's validation;
    resumed with a loader worker (the uninterrupted run had none): the same weights, to the bit.

    Stopped after the last step of epoch 0, the checkpoint holds the epoch's training figures: the resumed run
    trains no step of epoch 0 again, validates it, records one full row for it, then trains epoch 1."""
    if where == "epoch boundary":
        _signal_self_at(monkeypatch, engine, "evaluate", lambda n, args: n == 1)
        expected = (1, 0)
    else:
        stop_at = 6 if where == "mid-epoch" else 4
        _signal_self_at(monkeypatch, Precision, "step", lambda n, args: n == stop_at)
        expected = (1, 2) if where == "mid-epoch" else (0, 4)
    with pytest.raises(SystemExit) as exit_info:
        run_main_in_process(image_folder, *tiny_flags(tmp_path, *RESUME_FLAGS))
    assert exit_info.value.code == 128 + signal.SIGTERM
    monkeypatch.undo()
    path = tmp_path / "checkpoint.pth.tar"
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["step"]) == expected
    assert f"resume with --resume {path}" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"] == "SIGTERM"
    resumed = run_main_in_process(image_folder, *tiny_flags(tmp_path, *RESUME_FLAGS, "-j", "1", "--resume", str(path)))
    assert resumed["history"][-1]["epoch"] == 1
    final = weights(path)
    _, expected = straight
    assert all(torch.equal(expected[k], final[k]) for k in expected)
    if where == "end of training":
        assert state["trained_epoch"]["count"] == 4 * 8 and resumed["train_steps"] == 4
        assert [row["epoch"] for row in resumed["history"]] == [0, 1]
        assert resumed["history"][0]["train_loss"] == pytest.approx(state["trained_epoch"]["loss"])
        assert all(row["train_loss"] is not None and row["val_acc1"] is not None for row in resumed["history"])
        with open(tmp_path / "metrics.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert [row["epoch"] for row in rows] == ["0", "1"]
        assert all(row["train_loss"] and row["val_acc1"] for row in rows)


def test_ctrl_c_with_loader_workers_saves_and_exits(image_folder, tmp_path):
    proc = popen_main(image_folder, *tiny_flags(tmp_path, "--epochs", "50", "-j", "1", "--print-freq", "1"))
    wait_for_text(tmp_path / "train.log", "Epoch: [0][2/4]", proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C signals the whole process group: the loader worker too
    # It stops after the current step, a fraction of a second; the limit only tells a hang (50 epochs are minutes).
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    # Where exactly depends on how far the run got before the signal landed.
    assert "=> stopped by SIGINT at epoch " in out and "Traceback" not in err
    state = checkpoint.load_file(str(tmp_path / "checkpoint.pth.tar"))
    assert state["epoch"] * 4 + state["step"] >= 2


def test_an_fp16_run_stopped_mid_epoch_resumes_its_loss_scale_to_the_bit(image_folder, tmp_path, monkeypatch):
    """The scale falls from 2^20 while the steps overflow; stopped in epoch 1, the resumed run goes on with the
    checkpoint's scale and ends with the uninterrupted run's weights and scale."""
    flags = (*RESUME_FLAGS, "--amp", "--amp-dtype", "float16", "--init-loss-scale", str(2 ** 20),
             "--max-nonfinite-steps", "8")
    run_main_in_process(image_folder, *tiny_flags(tmp_path / "straight", *flags))
    _signal_self_at(monkeypatch, Precision, "step", lambda n, args: n == 6)
    with pytest.raises(SystemExit):
        run_main_in_process(image_folder, *tiny_flags(tmp_path / "stopped", *flags))
    monkeypatch.undo()
    path = tmp_path / "stopped" / "checkpoint.pth.tar"
    assert 1 < scaler_state(path)["scale"] < 2 ** 20
    run_main_in_process(image_folder, *tiny_flags(tmp_path / "stopped", *flags, "--resume", str(path)))
    straight = tmp_path / "straight" / "checkpoint.pth.tar"
    assert scaler_state(path) == scaler_state(straight)
    expected, final = weights(straight), weights(path)
    assert all(torch.equal(expected[k], final[k]) for k in expected)


def test_disk_full_at_a_save_is_an_error_and_keeps_the_previous_checkpoint(image_folder, tmp_path, monkeypatch,
                                                                           capsys):
    real_save = torch.save

    def save(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "--epochs", "3")], "No space left on device")
    assert checkpoint.load_file(str(tmp_path / "checkpoint.pth.tar"))["epoch"] == 1
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def lr_by_epoch(output_dir):
    with open(output_dir / "metrics.csv") as handle:
        return {int(row["epoch"]): float(row["lr"]) for row in csv.DictReader(handle)}


# --- --resume on a weights-only file ---

def test_resume_from_a_weights_only_file_is_one_line_naming_pretrained(image_folder, tmp_path, capsys):
    path = tmp_path / "weights.pth"
    torch.save(torchvision.models.mnasnet0_5(num_classes=3).state_dict(), path)
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "--epochs", "1", "--resume", str(path))],
                 f"use --pretrained {path}")
    # Weights are all that -e needs: scoring them through --resume still works.
    summary = run_main_in_process(image_folder, *tiny_flags(tmp_path / "eval", "-e", "--resume", str(path)))
    assert summary["val_images"] == 15


# --- --start-epoch ---

SHORT = ("--max-steps", "2", "--no-val")


def test_start_epoch_starts_a_fresh_run_where_an_uninterrupted_one_has_its_lr(image_folder, tmp_path):
    schedule = ("--epochs", "3", "--warmup", "1", *SHORT)
    run_main_in_process(image_folder, *tiny_flags(tmp_path / "whole", *schedule))
    late = run_main_in_process(image_folder, *tiny_flags(tmp_path / "late", *schedule, "--start-epoch", "2"))
    assert [h["epoch"] for h in late["history"]] == [2]
    assert lr_by_epoch(tmp_path / "late")[2] == pytest.approx(lr_by_epoch(tmp_path / "whole")[2], rel=1e-5)


def test_a_resumed_checkpoints_epoch_wins_over_start_epoch(image_folder, tmp_path):
    run_main_in_process(image_folder, *tiny_flags(tmp_path / "first", "--epochs", "1", *SHORT))
    summary = run_main_in_process(image_folder, *tiny_flags(tmp_path / "second", "--epochs", "3", *SHORT,
                                                            "--start-epoch", "0", "--resume",
                                                            str(tmp_path / "first" / checkpoint.CHECKPOINT_NAME)))
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert "--start-epoch 0 ignored" in (tmp_path / "second" / "train.log").read_text()


@pytest.mark.parametrize("start", ["-1", "3"])
def test_start_epoch_outside_the_run_is_an_error(image_folder, tmp_path, capsys, start):
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "--epochs", "3", "--start-epoch", start)],
                 f"--start-epoch {start} must be")


# --- a new --lr on resume ---

def test_resume_with_another_lr_scales_the_schedule(image_folder, tmp_path):
    """The non-finite stop advises a lower --lr on resume: it must act. Without --lr, the checkpoint's holds."""
    run_main_in_process(image_folder, *tiny_flags(tmp_path / "first", "--epochs", "1", *SHORT))  # --lr 0.01
    resume = ("--epochs", "2", *SHORT, "--resume", str(tmp_path / "first" / checkpoint.CHECKPOINT_NAME))
    run_main_in_process(image_folder, *tiny_flags(tmp_path / "same", *resume))
    run_main_in_process(image_folder, *tiny_flags(tmp_path / "lower", *resume, "--lr", "0.004"))
    # The default 0.1 is not asked for.
    run_main_in_process(image_folder, *without(tiny_flags(tmp_path / "unset", *resume), "--lr"))
    assert "--lr 0.004 replaces the checkpoint's 0.01" in (tmp_path / "lower" / "train.log").read_text()
    assert "replaces the checkpoint's" not in (tmp_path / "unset" / "train.log").read_text()
    same = lr_by_epoch(tmp_path / "same")[1]
    assert lr_by_epoch(tmp_path / "lower")[1] == pytest.approx(0.4 * same)
    assert lr_by_epoch(tmp_path / "unset")[1] == pytest.approx(same)
    # This run's schedule (2 epochs: cosine at half way) from the first resumed step, not the saved run's (1 epoch:
    # 0 at its end).
    assert same == pytest.approx(0.005)
    saved = torch.load(tmp_path / "lower" / checkpoint.CHECKPOINT_NAME, weights_only=True)
    assert saved["scheduler"]["base_lrs"] == pytest.approx([0.004, 0.004])


# --- a version-1 stem, from --pretrained and through --resume ---

V1_STEM_WEIGHT = "layers.0.weight"


@pytest.fixture(scope="module")
def trained_from_v1(image_folder, tmp_path_factory):
    """One epoch from torchvision's version-1 layout (stem 32 wide at every alpha): (the weights file, the run's
    output folder)."""
    root = tmp_path_factory.mktemp("v1")
    pretrained = root / "v1.pth"
    torch.save(v1_checkpoint("mnasnet0_5", num_classes=3), pretrained)
    with pytest.warns(UserWarning, match="version-1"):
        run_main_in_process(image_folder, *tiny_flags(root / "first", "--epochs", "1", *SHORT, "--pretrained",
                                                      str(pretrained)))
    return pretrained, root / "first"


def saved_weights(output_dir):
    return torch.load(output_dir / checkpoint.CHECKPOINT_NAME, weights_only=True)["state_dict"]


def test_a_version1_stem_trains_from_pretrained_and_after_resume(trained_from_v1, image_folder, tmp_path):
    """The version-1 stem is built before the optimizer takes the parameters, on --pretrained and on --resume:
    the stem trains in both runs."""
    pretrained, first = trained_from_v1
    after_first = saved_weights(first)
    assert after_first._metadata[""]["version"] == 1
    assert after_first[V1_STEM_WEIGHT].shape[0] == 32
    assert not torch.equal(after_first[V1_STEM_WEIGHT], torch.load(pretrained, weights_only=True)[V1_STEM_WEIGHT])
    with pytest.warns(UserWarning, match="version-1"):
        run_main_in_process(image_folder, *tiny_flags(tmp_path, "--epochs", "2", *SHORT, "--resume",
                                                      str(first / checkpoint.CHECKPOINT_NAME)))
    after_resumed = saved_weights(tmp_path)
    assert after_resumed._metadata[""]["version"] == 1
    assert not torch.equal(after_resumed[V1_STEM_WEIGHT], after_first[V1_STEM_WEIGHT])


def test_two_gloo_processes_resume_a_version1_stem(trained_from_v1, image_folder, tmp_path):
    """DDP registers the parameters it is given: with a stem replaced after it, every step would wait on the old
    stem's gradients."""
    _, first = trained_from_v1
    proc = run_main_subprocess(image_folder, *tiny_flags(tmp_path, "--epochs", "2", *SHORT,
                                                         "--multiprocessing-distributed", "--device-list", "0,1",
                                                         "--resume", str(first / checkpoint.CHECKPOINT_NAME)))
    assert proc.returncode == 0, proc.stderr
    assert not torch.equal(saved_weights(tmp_path)[V1_STEM_WEIGHT], saved_weights(first)[V1_STEM_WEIGHT])


# --- reruns: --resume auto, periodic saves ---

SHORT_RUN = ("--epochs", "1", "--max-steps", "1", "--no-val")


class Killed(Exception):
    """The process's end, as a SIGKILL or a dead node leaves it: no stop, no save."""


def kill_in_step(monkeypatch, number):
    """The run dies in its training step ``number`` (1-based, counted over the whole run), before applying it."""
    original, calls = Precision.step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise Killed
        return original(*args, **kwargs)
    monkeypatch.setattr(Precision, "step", step)


# --- --resume auto, and no silent overwrite ---

def test_a_rerun_without_resume_is_refused_and_leaves_the_checkpoint(image_folder, tmp_path, capsys):
    run_main_in_process(image_folder, *tiny_flags(tmp_path, *SHORT_RUN))
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    saved, log = path.read_bytes(), (tmp_path / "train.log").read_text()
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, *SHORT_RUN)], f"--output-dir {tmp_path}", str(path),
                 "--resume auto")
    assert path.read_bytes() == saved
    assert (tmp_path / "train.log").read_text() == log  # refused before its first line
    # Runs that write no checkpoint still start there: performance runs, evaluation.
    run_main_in_process(image_folder, *tiny_flags(tmp_path, *SHORT_RUN, "--no-checkpoint"))
    evaluated = run_main_in_process(image_folder, *tiny_flags(tmp_path, "-e", "--resume", "auto"))
    assert evaluated["val_images"] == 15
    assert path.read_bytes() == saved


def test_resume_auto_without_a_checkpoint_starts_a_new_run(image_folder, straight, tmp_path):
    summary = run_main_in_process(image_folder, *tiny_flags(tmp_path, *RESUME_FLAGS, "--resume", "auto"))
    assert f"=> --resume auto: no checkpoint in {tmp_path}, a new run starts" in (tmp_path / "train.log").read_text()
    assert summary["weights_sha256"] == straight[0]["weights_sha256"]


def test_resume_auto_continues_a_killed_run_to_the_same_weights(image_folder, straight, tmp_path, monkeypatch):
    """A requeued job runs its command again: the same command continues from the last epoch's checkpoint."""
    flags = tiny_flags(tmp_path, *RESUME_FLAGS, "--resume", "auto")
    kill_in_step(monkeypatch, 7)  # epoch 1, step 3: the checkpoint is epoch 0's
    with pytest.raises(Killed):
        run_main_in_process(image_folder, *flags)
    monkeypatch.undo()
    resumed = run_main_in_process(image_folder, *flags)
    log = (tmp_path / "train.log").read_text()
    assert f"=> resumed {tmp_path / checkpoint.CHECKPOINT_NAME} (epoch 1, step 0" in log
    assert [row["epoch"] for row in resumed["history"]] == [1]
    assert resumed["weights_sha256"] == straight[0]["weights_sha256"]


def test_resume_auto_refuses_another_runs_checkpoint_in_one_line(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    run_main_in_process(image_folder, *tiny_flags(out, *SHORT_RUN))
    saved = (out / checkpoint.CHECKPOINT_NAME).read_bytes()
    expect_error(capsys, [image_folder, *tiny_flags(out, *SHORT_RUN, "--resume", "auto", "-a", "mnasnet0_75",
                                                    "-b", "4")],
                 "is another run's checkpoint", "-a mnasnet0_5 (this run: mnasnet0_75)",
                 "global batch -b 8 (this run: 4)", "finished its 1 epochs", "--output-dir")
    two_classes = write_image_folder(tmp_path / "two", 3, 1, classes={"a": (200, 40, 40), "b": (40, 190, 60)})
    expect_error(capsys, [two_classes, *tiny_flags(out, "--epochs", "2", "--resume", "auto")],
                 "3 classes (this run's data: 2)")
    assert (out / checkpoint.CHECKPOINT_NAME).read_bytes() == saved


def test_a_refusal_ends_both_ranks_of_a_two_process_run(image_folder, tmp_path):
    run_main_in_process(image_folder, *tiny_flags(tmp_path, *SHORT_RUN))
    proc = run_main_subprocess(image_folder, *tiny_flags(tmp_path, *SHORT_RUN, "--multiprocessing-distributed",
                                                         "--device-list", "0,1"), env=clean_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "--resume auto" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--resume auto" in (tmp_path / "rank1.log").read_text()


def test_the_demo_run_twice_trains_again_in_a_new_folder(tmp_path, monkeypatch, capsys):
    """The demo's code path (no DIR, no --output-dir) with a step of its own settings."""
    monkeypatch.chdir(tmp_path)
    argv = ["--device", "cpu", "-j", "0", "-b", "8", *SHORT_RUN]
    main.main(argv)
    first = (tmp_path / "output" / checkpoint.CHECKPOINT_NAME).read_bytes()
    main.main(argv)
    said = capsys.readouterr().out
    assert "=> output holds an earlier run's checkpoint: this demo run writes to output/run-2" in said
    assert (tmp_path / "output" / "run-2" / checkpoint.CHECKPOINT_NAME).is_file()
    assert (tmp_path / "output" / checkpoint.CHECKPOINT_NAME).read_bytes() == first


# --- --save-every-minutes ---

# 6 ms: every training step takes longer, so a save is due after each.
EVERY_STEP = ("--save-every-minutes", "0.0001")


def test_a_periodic_save_lands_mid_epoch_and_a_killed_run_resumes_from_it(image_folder, straight, tmp_path,
                                                                         monkeypatch):
    flags = tiny_flags(tmp_path, *RESUME_FLAGS, *EVERY_STEP, "--resume", "auto")
    kill_in_step(monkeypatch, 7)
    with pytest.raises(Killed):
        run_main_in_process(image_folder, *flags)
    monkeypatch.undo()
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)  # the last step applied before the kill
    assert f"=> saved {path} at epoch 1, step 2/4 (--save-every-minutes 0.0001)" in (tmp_path / "train.log").read_text()
    resumed = run_main_in_process(image_folder, *flags)
    assert resumed["weights_sha256"] == straight[0]["weights_sha256"]


def test_a_run_sigkilled_after_a_periodic_save_resumes_to_the_same_weights(image_folder, straight, tmp_path):
    flags = tiny_flags(tmp_path, *RESUME_FLAGS, *EVERY_STEP, "--resume", "auto")
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), image_folder, *flags], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, started = tmp_path / "train.log", time.monotonic()
    while not (log.exists() and "at epoch 0, step 2/4" in log.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - started < 120, "no periodic save"
        time.sleep(0.05)
    proc.kill()  # wherever it is now, a save included: the last complete checkpoint is kept
    proc.communicate()
    state = torch.load(tmp_path / checkpoint.CHECKPOINT_NAME, weights_only=True)
    assert 2 <= 4 * state["epoch"] + state["step"] < 8  # a step of the run, not its end
    resumed = run_main_in_process(image_folder, *flags)
    assert resumed["weights_sha256"] == straight[0]["weights_sha256"]
