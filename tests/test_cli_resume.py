"""Reruns in an output folder that holds a checkpoint: --resume auto continues the run, a rerun without it is refused
before it writes anything, the demo run again trains in a new folder; --save-every-minutes' mid-epoch saves, on one
process and on two; the launchers' accuracy runs run again."""
import re
import subprocess
import sys
import time

import pytest
import torch

import main
from helpers import (NETWORK, ROOT, TINY, clean_env, expect_error, launch_ok, read_case, run_main_in_process,
                     run_main_subprocess, tiny_flags, write_image_folder)
from training import checkpoint
from training.precision import Precision

# 36 training images in batches of 8: 4 steps an epoch.
FLAGS = ("--epochs", "2", "--seed", "1", "--warmup", "1")
SHORT = ("--epochs", "1", "--max-steps", "1", "--no-val")


@pytest.fixture(scope="module")
def straight(image_folder, tmp_path_factory):
    """Two epochs without interruption: the run's summary."""
    return run_main_in_process(image_folder, *tiny_flags(tmp_path_factory.mktemp("straight"), *FLAGS))


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
    run_main_in_process(image_folder, *tiny_flags(tmp_path, *SHORT))
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    saved, log = path.read_bytes(), (tmp_path / "train.log").read_text()
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, *SHORT)], f"--output-dir {tmp_path}", str(path),
                 "--resume auto")
    assert path.read_bytes() == saved
    assert (tmp_path / "train.log").read_text() == log  # refused before its first line
    # Runs that write no checkpoint still start there: performance runs, evaluation.
    run_main_in_process(image_folder, *tiny_flags(tmp_path, *SHORT, "--no-checkpoint"))
    evaluated = run_main_in_process(image_folder, *tiny_flags(tmp_path, "-e", "--resume", "auto"))
    assert evaluated["val_images"] == 15
    assert path.read_bytes() == saved


def test_resume_auto_without_a_checkpoint_starts_a_new_run(image_folder, straight, tmp_path):
    summary = run_main_in_process(image_folder, *tiny_flags(tmp_path, *FLAGS, "--resume", "auto"))
    assert f"=> --resume auto: no checkpoint in {tmp_path}, a new run starts" in (tmp_path / "train.log").read_text()
    assert summary["weights_sha256"] == straight["weights_sha256"]


def test_resume_auto_continues_a_killed_run_to_the_same_weights(image_folder, straight, tmp_path, monkeypatch):
    """A requeued job runs its command again: the same command continues from the last epoch's checkpoint."""
    flags = tiny_flags(tmp_path, *FLAGS, "--resume", "auto")
    kill_in_step(monkeypatch, 7)  # epoch 1, step 3: the checkpoint is epoch 0's
    with pytest.raises(Killed):
        run_main_in_process(image_folder, *flags)
    monkeypatch.undo()
    resumed = run_main_in_process(image_folder, *flags)
    log = (tmp_path / "train.log").read_text()
    assert f"=> resumed {tmp_path / checkpoint.CHECKPOINT_NAME} (epoch 1, step 0" in log
    assert [row["epoch"] for row in resumed["history"]] == [1]
    assert resumed["weights_sha256"] == straight["weights_sha256"]


def test_resume_auto_refuses_another_runs_checkpoint_in_one_line(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    run_main_in_process(image_folder, *tiny_flags(out, *SHORT))
    saved = (out / checkpoint.CHECKPOINT_NAME).read_bytes()
    expect_error(capsys, [image_folder, *tiny_flags(out, *SHORT, "--resume", "auto", "-a", "mnasnet0_75", "-b", "4")],
                 "is another run's checkpoint", "-a mnasnet0_5 (this run: mnasnet0_75)",
                 "global batch -b 8 (this run: 4)", "finished its 1 epochs", "--output-dir")
    two_classes = write_image_folder(tmp_path / "two", 3, 1, classes={"a": (200, 40, 40), "b": (40, 190, 60)})
    expect_error(capsys, [two_classes, *tiny_flags(out, "--epochs", "2", "--resume", "auto")],
                 "3 classes (this run's data: 2)")
    assert (out / checkpoint.CHECKPOINT_NAME).read_bytes() == saved


def test_a_refusal_ends_both_ranks_of_a_two_process_run(image_folder, tmp_path):
    run_main_in_process(image_folder, *tiny_flags(tmp_path, *SHORT))
    proc = run_main_subprocess(image_folder, *tiny_flags(tmp_path, *SHORT, "--multiprocessing-distributed",
                                                         "--device-list", "0,1"), env=clean_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "--resume auto" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--resume auto" in (tmp_path / "rank1.log").read_text()


def test_the_demo_run_twice_trains_again_in_a_new_folder(tmp_path, monkeypatch, capsys):
    """The demo's code path (no DIR, no --output-dir) with a step of its own settings."""
    monkeypatch.chdir(tmp_path)
    argv = ["--device", "cpu", "-j", "0", "-b", "8", *SHORT]
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
    flags = tiny_flags(tmp_path, *FLAGS, *EVERY_STEP, "--resume", "auto")
    kill_in_step(monkeypatch, 7)
    with pytest.raises(Killed):
        run_main_in_process(image_folder, *flags)
    monkeypatch.undo()
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)  # the last step applied before the kill
    assert f"=> saved {path} at epoch 1, step 2/4 (--save-every-minutes 0.0001)" in (tmp_path / "train.log").read_text()
    resumed = run_main_in_process(image_folder, *flags)
    assert resumed["weights_sha256"] == straight["weights_sha256"]


def test_two_gloo_processes_save_at_the_same_steps(image_folder, tmp_path):
    proc = run_main_subprocess(image_folder, *tiny_flags(tmp_path, "--epochs", "1", "--no-val", "--print-freq", "1",
                                                         *EVERY_STEP, "--multiprocessing-distributed", "--device-list",
                                                         "0,1"), env=clean_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr
    position = r"saved \S+ at epoch (\d+), step (\d+)/(\d+)"
    rank0 = re.findall(rf"=> {position}", (tmp_path / "train.log").read_text())
    rank1 = re.findall(rf"=> rank 0 {position}", (tmp_path / "rank1.log").read_text())
    # 18 images a rank in batches of 4: 4 steps; the epoch's own save follows the last.
    assert rank0 == rank1 == [("0", "1", "4"), ("0", "2", "4"), ("0", "3", "4")]
    assert len(torch.load(tmp_path / checkpoint.CHECKPOINT_NAME, weights_only=True)["rng"]) == 2


def test_a_full_launcher_run_again_continues_its_checkpoint(image_folder, tmp_path):
    """The launchers' accuracy runs write to the same folder every time: run again, they go on from there."""
    flags = (f"--data_path={image_folder}", "--device=cpu", "--batch_size=8", "--workers=0", "--amp_level=off",
             f"--output_root={tmp_path}")
    launch_ok("train_full_1p.sh", *flags, "--epochs=1", *TINY)
    result = launch_ok("train_full_1p.sh", *flags, "--epochs=2", *TINY)
    assert "--resume auto" in result.stdout
    _, summary = read_case(tmp_path / "0", f"{NETWORK}_bs8_1p_acc")
    assert [row["epoch"] for row in summary["history"]] == [1]


def test_a_run_sigkilled_after_a_periodic_save_resumes_to_the_same_weights(image_folder, straight, tmp_path):
    flags = tiny_flags(tmp_path, *FLAGS, *EVERY_STEP, "--resume", "auto")
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
    assert resumed["weights_sha256"] == straight["weights_sha256"]
