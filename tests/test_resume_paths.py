"""Weights and run state going into main.py: wrapped state dicts, weights-only --resume, --start-epoch, a new --lr
on resume, the default BatchNorm momentum, equal rank digests without validation, and torchvision's version-1 stem
trained after --pretrained and --resume."""
import csv
import re
import warnings

import pytest
import torch
import torchvision
from torch import nn

import mnasnet
from helpers import without
from helpers import (NON_UNIT_ARCHS, TINY, assert_same_state, expect_error, launch_ok, logged_digest, randomize,
                     run_main_in_process, run_main_subprocess, tiny_flags, v1_checkpoint)
from training import checkpoint
from training.utils import state_digest

WRAPPERS = {"DataParallel": nn.DataParallel, "torch.compile": torch.compile}


def lr_by_epoch(output_dir):
    with open(output_dir / "metrics.csv") as handle:
        return {int(row["epoch"]): float(row["lr"]) for row in csv.DictReader(handle)}


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


# --- the default BatchNorm momentum ---

def test_default_bn_momentum_validates_above_chance_in_a_short_run(image_folder, tmp_path):
    """48 steps from scratch: at 0.01 the running statistics are still mostly their initial values and every
    validation image gets one class (33%); PyTorch's 0.1 follows the weights."""
    flags = [*without(tiny_flags(tmp_path), "--bn-momentum", "--lr"), "--lr", "0.03", "--epochs", "12", "--seed", "0"]
    summary = run_main_in_process(image_folder, *flags)
    assert summary["val_acc1"] > 100 / 3 + 30


def test_launchers_pass_the_reference_recipes_bn_momentum(tmp_path):
    result = launch_ok("train_performance_1p.sh", "--device=cpu", "--batch_size=4", "--steps=5", "--workers=0",
                       f"--output_root={tmp_path}", *TINY, "--dummy-images", "20")
    command = re.search(r"^running: (.*)$", result.stdout, re.M).group(1).split()
    assert command[command.index("--bn-momentum") + 1] == "0.1"


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


# --- rank digests without validation ---

def test_ranks_end_with_equal_digests_without_validation(image_folder, tmp_path):
    out = tmp_path / "ddp"
    proc = run_main_subprocess(image_folder, *tiny_flags(out, "--epochs", "1", "--seed", "0", "--no-val",
                                                         "--multiprocessing-distributed", "--device-list", "0,1"))
    assert proc.returncode == 0, proc.stderr
    saved = torch.load(out / checkpoint.CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    digest = state_digest(saved["state_dict"])
    assert logged_digest(out / "train.log", 0) == digest
    assert logged_digest(out / "rank1.log", 1) == digest


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
