"""What users run into: an error inside the training loop, FPS and step flags at their edges, image formats
besides JPEG, loader workers and their memory, an interrupted run resumed at an epoch's end, evaluation alone."""
import csv
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

import main
from helpers import ROOT, expect_error, launch, run_main_in_process, tiny_flags, write_image_folder
from training import data, distributed, pipeline, transforms
from training.precision import Precision

# Runs main.py with the loss raising on the N-th training step of one rank. The patch is at module level, so
# the processes --multiprocessing-distributed spawns (which import this script as __mp_main__) get it too.
FAILING_RUN = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import torch
    import torch.distributed as dist

    fail_at, fail_rank = int(os.environ["FAIL_AT_STEP"]), int(os.environ["FAIL_ON_RANK"])
    original = torch.nn.CrossEntropyLoss.forward
    calls = []

    def failing_forward(self, output, target):
        if torch.is_grad_enabled():  # training, not validation
            calls.append(1)
            rank = dist.get_rank() if dist.is_initialized() else 0
            if len(calls) == fail_at and rank == fail_rank:
                open(os.environ["FAILED_MARKER"], "w").close()
                raise ValueError("injected failure in the training loop")
        return original(self, output, target)

    torch.nn.CrossEntropyLoss.forward = failing_forward

    if __name__ == "__main__":
        import main
        main.main(sys.argv[1:])
""")

DUMMY = ("--dummy", "--dummy-images", "64", "--epochs", "2", "--no-checkpoint")


@pytest.mark.parametrize("processes", [1, 2])
def test_an_error_in_the_training_loop_ends_the_run_and_its_workers(tmp_path, processes):
    script = tmp_path / "failing_run.py"
    script.write_text(FAILING_RUN.format(root=str(ROOT)))
    flags = [*tiny_flags(tmp_path / "out", *DUMMY), "-j", "2"]
    if processes == 2:
        flags += ["-b", "16", "--multiprocessing-distributed", "--device-list", "0,1"]
    marker = tmp_path / "failed"
    env = dict(os.environ, OMP_NUM_THREADS="1", FAIL_AT_STEP="3", FAIL_ON_RANK=str(processes - 1),
               FAILED_MARKER=str(marker))
    # A session of its own, so that whatever is left of it after the timeout can be found and killed.
    proc = subprocess.Popen([sys.executable, str(script), *flags], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        start = time.time()
        while not marker.exists() and proc.poll() is None and time.time() - start < 300:
            time.sleep(0.2)  # start-up and two steps: slow on a busy machine
        out, err = proc.communicate(timeout=60)  # from the error on; generous: only "it did not hang"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the run did not exit after its error:\n{err[-3000:]}")
    assert proc.returncode != 0
    logs = err + "".join(p.read_text() for p in (tmp_path / "out").glob("rank*.log"))
    assert "Traceback" in logs and "ValueError: injected failure in the training loop" in logs, logs
    # No process of the session (a loader worker, a rank) outlives the run by more than a moment (the
    # launcher's multiprocessing resource tracker ends once it has cleaned up after the ranks).
    deadline = time.time() + 30
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    survivors = _session_processes(proc.pid)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors


def _session_processes(session):
    listed = subprocess.run(["pgrep", "-s", str(session)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in listed]


@pytest.mark.parametrize("warmup", ["0", "1"])
def test_fps_warmup_of_zero_or_one_measures_every_remaining_step(tmp_path, warmup):
    summary = run_main_in_process(*tiny_flags(tmp_path, *DUMMY, "--fps-warmup-steps", warmup, "--max-steps", "3",
                                              "--no-val"))
    assert summary["train_steps"] == 6
    assert summary["measured_steps"] == 2 * (3 - int(warmup))
    assert summary["fps"] > 0 and summary["measured_images"] == summary["measured_steps"] * 8


@pytest.mark.parametrize("steps, measured", [("1", 1), ("3", 2)])
def test_performance_launcher_with_fewer_than_five_steps(tmp_path, steps, measured):
    """A fifth of 1-4 steps is 0 warm-up steps: with 2 or more steps the first is warm-up, with 1 none is."""
    result = launch("train_performance_1p.sh", "--device=cpu", "--batch_size=8", f"--steps={steps}", "--workers=0",
                    f"--output_root={tmp_path}", "--", "--arch", "mnasnet0_5", "--train-crop-size", "48",
                    "--dummy-images", "64")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "0" / "MnasNet_for_PyTorch_bs8_1p_perf.json").read_text())
    assert summary["train_steps"] == int(steps) and summary["measured_steps"] == measured
    assert summary["fps"] > 0


# --- image formats: what ImageFolder lists and Pillow reads is an image ---

# (file name, Pillow format): every extension ImageFolder lists, and a GIF under a listed name.
FORMATS = [("a.bmp", "BMP"), ("b.tif", "TIFF"), ("c.tiff", "TIFF"), ("d.ppm", "PPM"), ("e.pgm", "PPM"),
           ("f.png", "PNG"), ("g.webp", "WEBP"), ("h_gif_inside.jpg", "GIF"), ("i.jpeg", "JPEG")]


@pytest.fixture(scope="module")
def formats_folder(tmp_path_factory):
    """The tiny folder, plus one image in each format in every train/ and val/ class."""
    root = write_image_folder(tmp_path_factory.mktemp("formats"), train_per_class=3, val_per_class=1)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in os.listdir(os.path.join(root, split)):
            for name, fmt in FORMATS:
                pixels = rng.integers(0, 255, (44, 52, 3), dtype=np.uint8)
                image = Image.fromarray(pixels).convert("L" if name.endswith(".pgm") else "RGB")
                image.save(os.path.join(root, split, cls, name), format=fmt)
    return root


def _datasets(root, name, fast_val=True):
    args = main.parse_args(["x", "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32",
                            "--min-crop-scale", "0.5", "--pipeline", name])
    (train_tf, train_read), (val_tf, val_read) = pipeline.build(name, args, fast_val=fast_val)
    return data.image_folders(root, train_tf, val_tf, seed=0, loaders=(train_read, val_read))


@pytest.mark.parametrize("name", ["fast", "tensor", "standard"])
def test_every_image_format_imagefolder_lists_is_read_as_an_image(formats_folder, name):
    for ds in _datasets(formats_folder, name):
        for index, (path, label) in enumerate(ds.samples):
            image, target = ds[index]
            assert target == label and tuple(image.shape) == (3, 32, 32), path
        assert not ds.unreadable.any(), [ds.samples[i][0] for i in ds.unreadable.nonzero().flatten()]
        assert {os.path.splitext(p)[1] for p, _ in ds.samples} >= {".bmp", ".tif", ".ppm", ".pgm", ".webp"}


def test_other_formats_train_with_strict_data(formats_folder, tmp_path):
    summary = run_main_in_process(formats_folder, *tiny_flags(tmp_path, "--epochs", "1", "--strict-data", "--pipeline",
                                                              "tensor", "--fast-val"))
    assert summary["train_skipped_images"] == 0 and summary["val_skipped_images"] == 0
    assert summary["val_images"] == 3 * (1 + len(FORMATS))


@pytest.mark.parametrize("name", ["fast", "tensor", "standard"])
def test_a_corrupt_file_in_any_format_is_still_unreadable(tmp_path, name):
    root = write_image_folder(tmp_path, train_per_class=2, val_per_class=1)
    folder = os.path.join(root, "train", "n01_red")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(os.path.join(folder, "cut.bmp"))
    with open(os.path.join(folder, "cut.bmp"), "r+b") as handle:
        handle.truncate(200)
    with open(os.path.join(folder, "text.tif"), "w") as handle:
        handle.write("not a picture\n")
    train_set, _ = _datasets(root, name)
    bad = {i for i, (path, _) in enumerate(train_set.samples) if os.path.basename(path) in ("cut.bmp", "text.tif")}
    for index in range(len(train_set)):
        train_set[index]
    assert set(train_set.unreadable.nonzero().flatten().tolist()) == bad
    assert all(train_set.read_error(i) for i in bad)


@pytest.mark.parametrize("name", ["fast", "tensor", "standard"])
def test_an_error_in_a_transform_is_a_traceback_not_an_unreadable_image(image_folder, monkeypatch, name):
    def broken(*args, **kwargs):
        raise ValueError("a bug in a transform")
    # Every pipeline's training crop goes through one of these.
    monkeypatch.setattr(transforms.F, "resized_crop", broken)
    monkeypatch.setattr(transforms.Image.Image, "resize", broken)
    monkeypatch.setattr(transforms.T.RandomResizedCrop, "forward", broken)
    train_set, _ = _datasets(image_folder, name)
    with pytest.raises(ValueError, match="a bug in a transform"):
        train_set[0]
    assert not train_set.unreadable.any()


# --- loader workers and host memory ---

def _loaders(image_folder, tmp_path, *extra):
    args = main.parse_args([image_folder, *tiny_flags(tmp_path, "-j", "2", *extra)])
    main.prepare(args)
    runtime = distributed.Runtime(kind="cpu", device=torch.device("cpu"))
    train_set, val_set = main.build_datasets(args, resume_path="")
    return main.build_loaders(train_set, val_set, runtime, args, main.setup_logging(str(tmp_path), "t.log", 0))


def test_validation_workers_end_with_each_pass_training_workers_stay(image_folder, tmp_path):
    train_loader, val_loader, _ = _loaders(image_folder, tmp_path)
    try:
        for _ in train_loader:
            pass
        training_workers = set(multiprocessing.active_children())
        assert len(training_workers) == 2
        for _ in val_loader:
            pass
        # Validation's workers are gone; training's two wait for the next epoch.
        assert set(multiprocessing.active_children()) == training_workers
    finally:
        data.close_loaders()
    assert not multiprocessing.active_children()


def test_image_folder_samples_are_numpy_arrays_not_python_objects(image_folder):
    train_set, val_set = _datasets(image_folder, "fast")
    for ds in (train_set, val_set):
        assert not isinstance(ds.samples, list)
        assert all(isinstance(value, np.ndarray) for value in vars(ds.samples).values())
        listed = data.datasets.ImageFolder(ds.root, allow_empty=True).samples
        assert [(path, ds.classes[label]) for path, label in ds.samples] == [
            (path, os.path.basename(os.path.dirname(path))) for path, _ in listed]


def _private_mib():
    with open("/proc/self/smaps_rollup") as handle:
        fields = dict(line.split()[:2] for line in handle if line.split()[0].startswith("Private"))
    return sum(int(value) for value in fields.values()) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux /proc only")
def test_a_forked_worker_reading_every_sample_does_not_copy_the_list():
    plain = [(f"/data/imagenet/train/n{c:08d}/n{c:08d}_{i:06d}.JPEG", c) for i in range(300) for c in range(1000)]
    packed = data.PackedSamples(plain)
    assert packed[12345] == plain[12345] and packed[-1] == plain[-1] and len(packed) == len(plain)
    growth = {}
    for name, samples in (("list", plain), ("packed", packed)):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a loader worker: forked, reads each sample once
            before = _private_mib()
            for index in range(len(samples)):
                samples[index]
            os.write(write, str(_private_mib() - before).encode())
            os._exit(0)
        os.close(write)
        growth[name] = float(os.read(read, 100))
        os.waitpid(pid, 0)
    # The list's pages are copied into the worker (about 30 MiB here); the arrays' are not.
    assert growth["list"] > 10 and growth["packed"] < 3, growth


# --- smaller user paths ---

@pytest.mark.parametrize("flag", ["--max-steps", "-j", "--fps-warmup-steps"])
def test_negative_counts_are_an_error(image_folder, tmp_path, capsys, flag):
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), flag, "-1"], flag.split("/")[0], "at least 0")


def test_a_stop_after_an_epochs_last_step_resumes_with_that_epochs_validation(image_folder, tmp_path, monkeypatch):
    """SIGTERM after the 4th (last) step of epoch 0: saved at (0, 4) with the epoch's training figures; the resumed
    run trains no step of epoch 0 again, validates it, records one full row for it (training figures included), then
    trains epoch 1: one row per epoch, none empty, and epoch 0 takes part in the best checkpoint."""
    original, calls = Precision.step, []

    def step_then_sigterm(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    monkeypatch.setattr(Precision, "step", step_then_sigterm)
    flags = ("--epochs", "2", "--seed", "1", "--warmup", "1")
    with pytest.raises(SystemExit):
        run_main_in_process(image_folder, *tiny_flags(tmp_path, *flags))
    monkeypatch.undo()
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 4) and saved["trained_epoch"]["count"] == 4 * 8
    resumed = run_main_in_process(image_folder, *tiny_flags(tmp_path, *flags, "--resume",
                                                            str(tmp_path / "checkpoint.pth.tar")))
    assert [row["epoch"] for row in resumed["history"]] == [0, 1]
    assert resumed["history"][0]["train_loss"] == pytest.approx(saved["trained_epoch"]["loss"])
    assert all(row["train_loss"] is not None and row["val_acc1"] is not None for row in resumed["history"])
    assert resumed["train_steps"] == 4
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0", "1"] and all(row["train_loss"] and row["val_acc1"] for row in rows)


@pytest.fixture(scope="module")
def one_epoch(image_folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one_epoch")
    summary = run_main_in_process(image_folder, *tiny_flags(output_dir, "--epochs", "1", "--seed", "0"))
    return output_dir / "checkpoint.pth.tar", summary


def test_evaluate_needs_only_val_and_the_checkpoints_classes(image_folder, one_epoch, tmp_path):
    path, trained = one_epoch
    val_only = tmp_path / "val_only"
    shutil.copytree(os.path.join(image_folder, "val"), val_only / "val")
    # Class n01_red's folder missing too: labels still follow the checkpoint's class list.
    shutil.rmtree(val_only / "val" / "n01_red")
    full = run_main_in_process(image_folder, *tiny_flags(tmp_path / "full", "-e", "--resume", str(path)))
    assert full["val_acc1"] == pytest.approx(trained["val_acc1"])
    # -b 64: more than the 36 training images (evaluation needs no training batch).
    alone = run_main_in_process(str(val_only), *tiny_flags(tmp_path / "alone", "-e", "--resume", str(path), "-b", "64"))
    assert alone["val_images"] == 10


def test_evaluate_without_train_or_recorded_classes_is_one_line(image_folder, one_epoch, tmp_path, capsys):
    path, _ = one_epoch
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(path, weights_only=True)["state_dict"], bare)  # weights only: no class list
    shutil.copytree(os.path.join(image_folder, "val"), tmp_path / "val_only" / "val")
    expect_error(capsys, [str(tmp_path / "val_only"), *tiny_flags(tmp_path, "-e", "--pretrained", str(bare))],
                 "no train/", "classes")


def test_resuming_a_finished_run_is_one_line(image_folder, one_epoch, tmp_path, capsys):
    """A checkpoint of a run that trained all its --epochs: nothing is left to train, which must not pass for a
    successful run."""
    path, _ = one_epoch
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "--epochs", "1", "--resume", str(path))],
                 "has finished its 1 epochs", "--epochs")
