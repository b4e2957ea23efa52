"""The accelerator paths, run on the CPU: the gpu pipeline's unreadable-image guard, the prefetcher's streams,
cuDNN autotuning, BatchNorm folding under --sync-bn, the NPU --compile message, and tools/device_check.py."""
import argparse
import contextlib
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import main
import mnasnet
from helpers import write_jpeg, write_truncated_jpeg, write_random_bytes, write_jpeg_with_corrupt_scan
from helpers import ROOT, cpu_runtime, expect_error, run_main_in_process, tiny_flags, write_image_folder
from training import data, devices, distributed, engine, pipeline, prefetch
from training.utils import UserError

import device_check


def test_gpu_pipeline_workers_turn_away_truncated_and_foreign_files(tmp_path):
    good = pipeline.bytes_loader(write_jpeg(tmp_path / "good.JPEG"))
    assert good.path.endswith("good.JPEG") and good.data.dtype == torch.uint8
    png = tmp_path / "png.JPEG"
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    pipeline.bytes_loader(str(png))  # not a JPEG, still an image: decoded on the host later
    for bad in (write_truncated_jpeg(tmp_path / "truncated.JPEG"), write_random_bytes(tmp_path / "foreign.JPEG")):
        with pytest.raises(OSError):
            pipeline.bytes_loader(bad)
    pipeline.bytes_loader(write_jpeg_with_corrupt_scan(tmp_path / "scan.JPEG"))  # left to the device stage


def test_gpu_pipeline_file_bytes_cross_from_a_loader_worker(image_folder):
    """torchvision.io.read_file's tensor claims to be in shared memory and is not: a worker that sent it failed
    to pickle it in its queue thread, and the main process waited forever (timeout=60 turns that into an error)."""
    train_set, _ = data.image_folders(image_folder, None, None, loaders=(pipeline.bytes_loader, None))
    loader = torch.utils.data.DataLoader(train_set, batch_size=4, num_workers=1, timeout=60,
                                         collate_fn=pipeline.collate_bytes)
    files, labels = next(iter(loader))
    path, label = train_set.samples[0]
    with open(path, "rb") as handle:
        assert files[0].path == path and bytes(files[0].data.numpy()) == handle.read() and labels[0] == label


def test_device_decode_replaces_in_training_and_drops_in_validation(tmp_path, caplog):
    paths = [write_jpeg(tmp_path / "a.JPEG", 1), write_jpeg_with_corrupt_scan(tmp_path / "bad.JPEG"), write_jpeg(tmp_path / "c.JPEG", 2)]
    files = [pipeline.bytes_loader(p) for p in paths]
    log = types.SimpleNamespace(warning=lambda message: logged.append(message))
    logged = []
    train = prefetch.DeviceDecode(cpu_runtime(), True, 32, log=log)
    train.start_pass()
    images, labels = train((files, torch.tensor([0, 1, 2])))
    # The unreadable second image is replaced by a readable one of the batch, label and all.
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [0, 2, 2]
    assert train.skipped == 1 and len(logged) == 1 and paths[1] in logged[0] and "marker" in logged[0]
    train((files, torch.tensor([0, 1, 2])))
    assert train.skipped == 1 and len(logged) == 1  # counted once a pass, logged once a run
    train.start_pass()
    assert train.skipped == 0
    val = prefetch.DeviceDecode(cpu_runtime(), False, 32, resize_size=36)
    images, labels = val((files, torch.tensor([0, 1, 2])))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 2] and val.skipped == 1
    with pytest.raises(UserError, match="--strict-data"):
        prefetch.DeviceDecode(cpu_runtime(), True, 32, strict=True)((files, torch.tensor([0, 1, 2])))


def test_a_validation_batch_of_unscored_files_only_is_empty(tmp_path):
    """The workers turned away every file of the batch (a rank's last batch of one, say): no images, no error."""
    files = [pipeline.bytes_loader(write_jpeg(tmp_path / "a.JPEG", 1))]
    val = prefetch.DeviceDecode(cpu_runtime(), False, 32, resize_size=36)
    images, labels = val((files, torch.tensor([data.SKIPPED_LABEL])))
    assert images.shape == (0, 3, 32, 32) and len(labels) == 0


@pytest.fixture(scope="module")
def bad_jpeg_folder(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("badjpeg"), train_per_class=7, val_per_class=2)
    bad = [write_truncated_jpeg(os.path.join(root, "train", "n01_red", "truncated.JPEG")),
           write_random_bytes(os.path.join(root, "train", "n02_green", "foreign.JPEG")),
           write_jpeg_with_corrupt_scan(os.path.join(root, "train", "n03_blue", "scan.JPEG")),
           write_random_bytes(os.path.join(root, "val", "n01_red", "foreign.JPEG")),
           write_jpeg_with_corrupt_scan(os.path.join(root, "val", "n02_green", "scan.JPEG"))]
    return root, bad


def test_gpu_pipeline_counts_replaces_and_skips_unreadable_images(bad_jpeg_folder, tmp_path):
    """--pipeline gpu (its device code on the CPU): the workers' header check and the device stage's decode
    each catch some of the broken files, and the run counts them as the other pipelines do."""
    root, bad = bad_jpeg_folder
    summary = run_main_in_process(root, *tiny_flags(tmp_path, "--epochs", "2", "-j", "1", "--seed", "0",
                                                    "--pipeline", "gpu", "--fast-val"))
    log = (tmp_path / "train.log").read_text()
    for path in bad:
        assert log.count(path) == 1, log
    assert [h["train_skipped_images"] for h in summary["history"]] == [3, 3]
    assert summary["train_steps"] == 2 * (24 // 8)  # replaced, not dropped
    assert summary["val_images"] == 6 and summary["val_skipped_images"] == 2
    assert "(6 images scored, 2 unreadable skipped)" in log


def test_strict_data_stops_at_a_file_only_the_device_stage_finds(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", train_per_class=3, val_per_class=1)
    bad = write_jpeg_with_corrupt_scan(os.path.join(root, "train", "n02_green", "scan.JPEG"))
    err = expect_error(capsys, [root, *tiny_flags(tmp_path / "out", "--epochs", "1", "--pipeline", "gpu",
                                                  "--strict-data", "-b", "10")], "--strict-data")
    assert bad in err


def _recording_streams(monkeypatch, events):
    """torch.cuda's stream API as DeviceLoader uses it (Stream, current_stream, stream(), wait_stream,
    record_stream), recording who waits for whom."""
    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    compute, side = Stream("compute"), Stream("side")
    fake = types.SimpleNamespace(Stream=lambda dev: side, current_stream=lambda dev=None: compute,
                                 stream=lambda s: contextlib.nullcontext())
    monkeypatch.setattr(devices, "device_module", lambda kind: fake if kind == "fake" else None)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: events.append(f"record on {s.name}"),
                        raising=False)


def test_side_stream_waits_for_the_mean_and_std_before_it_first_uses_them(monkeypatch):
    """ToDevice makes its mean and std on the current stream; the side stream that normalises with them must
    wait for that stream before its first batch."""
    events = []
    _recording_streams(monkeypatch, events)
    runtime = cpu_runtime()
    runtime.kind = "fake"
    transfer = prefetch.ToDevice(runtime)

    def recorded_transfer(batch):
        events.append("transfer")
        return transfer(batch)
    recorded_transfer.skipped, recorded_transfer.start_pass = 0, lambda: None
    batches = [(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), torch.tensor([1, 2]))] * 2
    assert len(list(prefetch.DeviceLoader(batches, runtime, recorded_transfer))) == 2
    assert events.index("side waits for compute") < events.index("transfer")


def test_cudnn_benchmark_is_set_for_cuda_only(monkeypatch, kernel_flags):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    torch.backends.cudnn.benchmark = False
    fake_cuda = types.SimpleNamespace(set_device=lambda dev: None, device_count=lambda: 1)
    monkeypatch.setattr(devices, "device_module", lambda kind: fake_cuda)
    args = argparse.Namespace(device_kind="cpu", device_ids=[0], multiprocessing_distributed=False,
                              memory_format="auto", npu_jit_compile="auto", npu_internal_format="auto", tf32="auto",
                              deterministic=False)
    distributed.setup_runtime(args, 0)
    assert torch.backends.cudnn.benchmark is False
    args.device_kind = "cuda"
    assert distributed.setup_runtime(args, 0).device == torch.device("cuda", 0)
    assert torch.backends.cudnn.benchmark is True


def test_fuse_bn_folds_sync_batchnorm_and_scores_the_same():
    torch.manual_seed(0)
    model = mnasnet.ARCHS["mnasnet0_5"](num_classes=5)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 48, 48))  # running statistics that are not the initial 0 and 1
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    images = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        expected = model(images)
        folded = engine.inference_model(model, fuse_bn=True)
        norms = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert not norms
        torch.testing.assert_close(folded(images), expected, rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())  # the trained model is untouched


def test_compile_on_npu_is_refused_naming_torch_npus_backends(monkeypatch, tmp_path):
    monkeypatch.setattr(devices, "resolve_device_kind", lambda requested: "npu")
    args = main.parse_args(["--dummy", "--compile", "--output-dir", str(tmp_path)])
    main.check_args(args)
    with pytest.raises(UserError) as error:
        main.prepare(args)
    assert "npugraph_ex" in str(error.value) and "torchair" not in str(error.value)


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
