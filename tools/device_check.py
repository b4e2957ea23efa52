"""Acceptance check for a machine with GPUs or NPUs: one PASS, FAIL or SKIP line per check, then a table.

    tools/device_check.sh                        # the accelerator found, 2 processes if it has 2+ devices
    tools/device_check.sh --device cpu --quick   # the same checks in miniature on the CPU (tests run this)

Each check runs main.py as a user would (its own processes, --summary-json):

- amp-training: ``--amp`` on synthetic data (--dummy) with a fixed seed: the mean training loss of the last epoch
  is below the first's. The run is also the reference for ``resume``.
- overflow: ``--amp --loss-scale 2^24``: fp16 gradients overflow for the first steps, which the loss scaler skips
  while it halves the scale; the run must end with skipped steps counted and finite weights. SKIP on the CPU,
  whose bf16 autocast has no loss scaler.
- resume: the amp-training run again, stopped by SIGTERM a few steps into epoch 0 and resumed from its checkpoint,
  ends with the straight run's weights (bit for bit on the CPU; within a relative 1e-3 elsewhere, where cuDNN's
  autotuned kernels and atomics are not bit-reproducible).
- jpeg-pipeline: training on a generated JPEG folder holding a truncated file, random bytes named .JPEG and a JPEG
  with corrupt compressed data, through ``--pipeline gpu --fast-val`` (``fast`` on NPU): the run ends and counts
  the unreadable files (at least the two the workers' header check finds).
- eval: ``-e`` on that run's checkpoint with ``--no-fuse-bn``, ``--fuse-bn`` and ``--fuse-bn --compile`` (fp32): the
  same Acc@1 and Acc@5 (within one image) and loss (relative 1e-3).
- bench: bench.py's table (throughput of the input pipelines, training and eval steps, end to end; peak memory).

Exit status 1 when a check FAILs.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import autoload_off  # noqa: E402,F401  (before torch: torch must not autoload torch_npu, see autoload_off.py)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import device  # noqa: E402
OVERFLOW_LOSS_SCALE = 2 ** 24


class Report:
    """Collects the results; each is printed as soon as it is known."""

    def __init__(self):
        self.results = []

    def add(self, status, name, detail):
        self.results.append((status, name, detail))
        print(f"{status} {name}: {detail}", flush=True)

    def check(self, name, ok, detail):
        self.add("PASS" if ok else "FAIL", name, detail)

    @property
    def failed(self):
        return any(status == "FAIL" for status, _, _ in self.results)


# --- the comparisons, kept apart from the runs so the tests can feed them broken cases ---

def loss_fell(history):
    """(ok, detail) for a run's per-epoch history: the last epoch's mean loss below the first's, all finite."""
    losses = [epoch["train_loss"] for epoch in history]
    ok = len(losses) >= 2 and all(loss is not None and math.isfinite(loss) for loss in losses) \
        and losses[-1] < losses[0]
    return ok, "mean training loss per epoch " + ", ".join("n/a" if v is None else f"{v:.3f}" for v in losses)


def weights_finite(state_dict):
    bad = [key for key, value in state_dict.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    return not bad, f"non-finite: {', '.join(bad[:3])}" if bad else "all weights finite"


def same_weights(expected, actual, rtol):
    """(ok, detail): the same keys; integer tensors equal; float tensors equal (rtol 0) or, over all of them
    together, ||actual - expected|| <= rtol * ||expected||."""
    if expected.keys() != actual.keys():
        return False, f"different keys: {sorted(set(expected) ^ set(actual))[:3]}"
    floats = [key for key in expected if expected[key].is_floating_point()]
    ints_equal = all(torch.equal(expected[key], actual[key]) for key in expected if key not in floats)
    identical = ints_equal and all(torch.equal(expected[key], actual[key]) for key in floats)
    diff = math.sqrt(sum(float((actual[k].double() - expected[k].double()).pow(2).sum()) for k in floats))
    norm = math.sqrt(sum(float(expected[k].double().pow(2).sum()) for k in floats))
    relative = diff / norm if norm else diff
    ok = identical or (rtol > 0 and ints_equal and relative <= rtol)
    return ok, "bit-identical" if identical else f"relative difference {relative:.2e} (allowed {rtol:g})"


def evaluations_agree(results, rtol=1e-3):
    """(ok, detail) for {name: -e summary}: Acc@1 and Acc@5 within one image of the first's, loss within rtol."""
    names = list(results)
    first = results[names[0]]
    one_image = 100.0 / max(first["val_images"] or 1, 1) + 1e-9
    ok = True
    for name in names[1:]:
        other = results[name]
        ok &= other["val_images"] == first["val_images"]
        ok &= all(abs(other[key] - first[key]) <= one_image for key in ("val_acc1", "val_acc5"))
        ok &= math.isclose(other["val_loss"], first["val_loss"], rel_tol=rtol)
    detail = "; ".join(f"{name} Acc@1 {r['val_acc1']:.2f} Acc@5 {r['val_acc5']:.2f} loss {r['val_loss']:.5f}"
                       for name, r in results.items())
    return bool(ok), f"{detail} ({first['val_images']} images)"


# --- running main.py ---

class Runner:
    def __init__(self, work):
        self.work = work
        self.rows = []

    def command(self, name, flags):
        out = os.path.join(self.work, name)
        os.makedirs(out, exist_ok=True)
        return out, [sys.executable, os.path.join(ROOT, "main.py"), *flags, "--output-dir", out,
                     "--summary-json", os.path.join(out, "summary.json")]

    def run(self, name, flags, label=None, timeout=600):
        """main.py FLAGS in its own processes, in the folder NAME: (exit status, summary or None, stderr's tail);
        the table shows it as LABEL (default NAME)."""
        out, cmd = self.command(name, flags)
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return done.returncode, self.summary(label or name, out), done.stderr[-1500:]

    def run_and_stop(self, name, flags, after_step, grace=120, timeout=600):
        """main.py FLAGS (with --print-freq 1), sent SIGTERM once rank 0 logs step ``after_step`` of epoch 0:
        (exit status, or None when it had not exited ``grace`` seconds after the signal and was killed)."""
        out, cmd = self.command(name, flags)
        log = os.path.join(out, "train.log")
        # A session of its own: its process group (workers, loader workers) can be killed if it hangs.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        start = time.time()
        marker = f"Epoch: [0][{after_step}/"
        while proc.poll() is None and time.time() - start < timeout:
            if os.path.exists(log) and marker in open(log).read():
                proc.send_signal(signal.SIGTERM)  # the launcher alone, as a scheduler might; it tells its workers
                break
            time.sleep(0.05)
        try:
            code = proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        self.summary(f"{name} (stopped)", out)
        return code

    def summary(self, label, out):
        path = os.path.join(out, "summary.json")
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            summary = json.load(handle)
        self.rows.append((label, summary))
        return summary


def checkpoint_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def write_jpeg_folder(root, classes, train_per_class, val_per_class, size):
    """data.write_striped_folder's classes (learnable in a few epochs), of which three training files and one
    validation file are then broken. Returns {what: path} of those."""
    colours = [(200, 40, 40), (40, 190, 60), (40, 60, 210), (200, 200, 40)][:classes]
    data.write_striped_folder(root, {f"c{i}": colour for i, colour in enumerate(colours)}, train_per_class,
                              val_per_class, size, quality=90)
    rng = np.random.default_rng(0)
    with open(os.path.join(root, "train", "c0", "c0_0.JPEG"), "rb") as handle:
        raw = handle.read()
    scan = raw.index(b"\xff\xda")
    scan += 2 + int.from_bytes(raw[scan + 2:scan + 4], "big")
    broken = {"truncated": ("train/c0/c0_1.JPEG", raw[:len(raw) // 2]),
              "random bytes": ("train/c1/c1_1.JPEG", rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()),
              # A marker libjpeg refuses inside the compressed data; header and end marker intact.
              "corrupt scan": ("train/c2/c2_1.JPEG", raw[:scan] + b"\xff\x40" + raw[scan:]),
              "val random bytes": ("val/c0/c0_1.JPEG", rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())}
    for name, content in broken.values():
        with open(os.path.join(root, name), "wb") as handle:
            handle.write(content)
    return {what: os.path.join(root, name) for what, (name, _) in broken.items()}


# --- the checks ---

def settings(args, kind, count):
    """Sizes: a real model and crop on an accelerator, the tests' miniature on the CPU with --quick."""
    procs = args.procs or (2 if kind != "cpu" and count >= 2 else 1)
    if args.quick:
        sizes = dict(arch="mnasnet0_5", crop=48, batch=8, steps=6, epochs=2, stop_at=2, jpeg_size=48,
                     jpeg_train=8, jpeg_val=3, jpeg_epochs=2, compile="eager", workers=1)
    else:
        sizes = dict(arch="mnasnet1_0", crop=224, batch=64 * procs, steps=24, epochs=3, stop_at=6, jpeg_size=256,
                     jpeg_train=96, jpeg_val=24, jpeg_epochs=3, compile="inductor", workers=None)
    sizes["procs"] = procs
    return sizes


def common_flags(kind, s):
    flags = ["-a", s["arch"], "--device", kind, "--train-crop-size", str(s["crop"]),
             "--val-crop-size", str(s["crop"]), "--val-resize-size", str(s["crop"] * 8 // 7), "--seed", "0",
             "--fps-warmup-steps", "2"]
    if s["workers"] is not None:
        flags += ["-j", str(s["workers"])]
    if s["procs"] > 1:
        flags += ["--multiprocessing-distributed", "--device-list", ",".join(map(str, range(s["procs"])))]
    return flags


def check_training_and_resume(runner, report, kind, s, base):
    dummy = [*base, "--dummy", "--dummy-images", str(s["steps"] * s["batch"]), "-b", str(s["batch"]),
             "--epochs", str(s["epochs"]), "--amp", "--no-val", "--print-freq", "1"]
    code, straight, err = runner.run("amp-training", dummy)
    if code or straight is None:
        report.add("FAIL", "amp-training", f"main.py exited {code}: {err.strip().splitlines()[-1:]}")
        report.add("FAIL", "resume", "no straight run to compare with")
        return
    ok, detail = loss_fell(straight["history"])
    report.check("amp-training", ok, f"{straight['world_size']} x {kind}, {detail}")

    grace = 120
    code = runner.run_and_stop("resume", dummy, s["stop_at"], grace)
    path = os.path.join(runner.work, "resume", "checkpoint.pth.tar")
    exited = code == 128 + signal.SIGTERM
    if not os.path.exists(path):
        report.add("FAIL", "resume", f"the run to interrupt exited {code}, and wrote no checkpoint")
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    where = f"stopped at epoch {state['epoch']} step {state['step']}"
    if not exited:
        where += (f", BUT exited {code} (expected {128 + signal.SIGTERM})" if code is not None else
                  f", BUT still running {grace} s after SIGTERM (killed)")
    code, _, err = runner.run("resume", [*dummy, "--resume", path], label="resume (resumed)")
    if code:
        report.add("FAIL", "resume", f"{where}; the resumed run exited {code}: {err.strip().splitlines()[-1:]}")
        return
    expected = checkpoint_weights(os.path.join(runner.work, "amp-training", "checkpoint.pth.tar"))
    ok, detail = same_weights(expected, checkpoint_weights(path), rtol=0 if kind == "cpu" else 1e-3)
    report.check("resume", ok and exited,
                 f"{where} ({'mid-epoch' if state['step'] else 'epoch boundary'}), resumed: {detail}")


def check_overflow(runner, report, kind, s, base):
    if kind == "cpu":
        report.add("SKIP", "overflow", "bf16 autocast on the CPU has no loss scaler, so no overflow to inject")
        return
    flags = [*base, "--dummy", "--dummy-images", str(s["steps"] * s["batch"]), "-b", str(s["batch"]),
             "--epochs", "1", "--amp", "--no-val", "--loss-scale", str(OVERFLOW_LOSS_SCALE),
             "--max-nonfinite-steps", str(s["steps"])]
    code, summary, err = runner.run("overflow", flags)
    if code or summary is None:
        report.add("FAIL", "overflow", f"main.py exited {code}: {err.strip().splitlines()[-1:]}")
        return
    finite, detail = weights_finite(checkpoint_weights(os.path.join(runner.work, "overflow", "checkpoint.pth.tar")))
    skipped = summary["skipped_steps"]
    report.check("overflow", finite and skipped > 0,
                 f"loss scale {OVERFLOW_LOSS_SCALE}: {skipped} of {summary['train_steps']} steps skipped "
                 f"(expected at least 1), {detail}, final loss {summary['train_loss']}")


def check_jpeg_and_eval(runner, report, kind, s, base):
    folder = os.path.join(runner.work, "jpegs")
    broken = write_jpeg_folder(folder, 4, s["jpeg_train"], s["jpeg_val"], s["jpeg_size"])
    name = "gpu" if kind != "npu" else "fast"
    flags = [*base, folder, "-b", str(s["batch"]), "--epochs", str(s["jpeg_epochs"]), "--pipeline", name,
             "--fast-val", "--lr", "0.05", "--print-freq", "10"]
    code, summary, err = runner.run("jpeg-pipeline", flags)
    if code or summary is None:
        report.add("FAIL", "jpeg-pipeline", f"--pipeline {name}: main.py exited {code}: "
                                            f"{err.strip().splitlines()[-1:]}")
        report.add("FAIL", "eval", "no checkpoint to evaluate")
        return
    # Each rank logs the files it met: rank 0 in train.log, the others in rank<k>.log.
    log = ""
    for log_name in sorted(os.listdir(os.path.join(runner.work, "jpeg-pipeline"))):
        if log_name.endswith(".log"):
            with open(os.path.join(runner.work, "jpeg-pipeline", log_name)) as handle:
                log += handle.read()
    logged = [what for what, path in broken.items() if f"skipped unreadable image {path}" in log]
    train_broken = [what for what in broken if not what.startswith("val")]
    # The workers' header check finds the truncated file and the random bytes; the corrupt scan is the decoder's
    # (nvJPEG may decode some corrupt data without an error).
    ok = ({"truncated", "random bytes", "val random bytes"} <= set(logged)
          and summary["train_skipped_images"] == sum(what in logged for what in train_broken)
          and summary["val_skipped_images"] == 1 and summary["val_images"] == 4 * s["jpeg_val"] - 1)
    report.check("jpeg-pipeline", ok,
                 f"--pipeline {name}: logged {', '.join(logged) or 'none'}; counted {summary['train_skipped_images']} "
                 f"in training, {summary['val_skipped_images']} in validation; val Acc@1 {summary['val_acc1']:.1f} "
                 f"(chance 25), {summary['fps']:.0f} img/s")

    weights = os.path.join(runner.work, "jpeg-pipeline", "checkpoint.pth.tar")
    evaluate = [*base, folder, "-b", str(s["batch"]), "-e", "--resume", weights, "--print-freq", "1000"]
    variants = {"eager": ["--no-fuse-bn"], "fuse-bn": ["--fuse-bn"],
                f"fuse-bn+compile({s['compile']})": ["--fuse-bn", "--compile", s["compile"]]}
    results = {}
    for variant, extra in variants.items():
        code, summary, err = runner.run(f"eval-{variant.split('(')[0]}", [*evaluate, *extra])
        if code or summary is None:
            report.add("FAIL", "eval", f"-e {' '.join(extra)}: main.py exited {code}: "
                                       f"{err.strip().splitlines()[-1:]}")
            return
        results[variant] = summary
    report.check("eval", *evaluations_agree(results))


def run_bench(report, kind, args, work):
    if args.quick or args.skip_bench:
        report.add("SKIP", "bench", "--quick" if args.quick else "--skip-bench")
        return
    json_path = os.path.join(work, "bench.json")
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--device", kind, "--amp", "--train-batch", "256",
           "--eval-batch", "512", "--steps", "20", "--warmup-steps", "5", "--repeats", "3", "--images", "96",
           "--e2e-images", "1024", "--workers", "8", "--json", json_path]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480)
    print(done.stdout, flush=True)
    report.check("bench", done.returncode == 0,
                 f"bench.py exited {done.returncode}" + (f": {done.stderr.strip().splitlines()[-1:]}"
                                                         if done.returncode else f", JSON in {json_path}"))


def print_table(runner):
    print(f"\n{'run':<22} {'procs':>5} {'img/s':>9} {'ms/step':>8} {'peak device MB':>15} {'wall s':>7}")
    for name, summary in runner.rows:
        def number(key, width, digits):
            value = summary.get(key)
            return f"{value:{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
        print(f"{name:<22} {summary['world_size']:>5} {number('fps', 9, 1)} {number('step_time_ms', 8, 1)} "
              f"{number('peak_device_memory_mb', 15, 0)} {number('e2e_seconds', 7, 1)}")


def device_description(kind):
    if kind == "cpu":
        import platform
        return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    module = getattr(torch, kind)
    names = sorted({module.get_device_name(i) for i in range(module.device_count())})
    return f"{module.device_count()} x {', '.join(names)}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "npu", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="miniature sizes (the CPU smoke test)")
    parser.add_argument("--procs", type=int, default=None, help="processes per run (default: 2 with 2+ devices)")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (default: a temp dir)")
    args = parser.parse_args(argv)

    kind = device.resolve_device_kind(args.device)
    count = device.device_count(kind)
    s = settings(args, kind, count)
    print(f"device check: {device_description(kind)}, torch {torch.__version__}, {s['procs']} process(es) per run",
          flush=True)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = args.keep or tmp
        runner = Runner(work)
        base = common_flags(kind, s)
        started = time.time()
        check_training_and_resume(runner, report, kind, s, base)
        check_overflow(runner, report, kind, s, base)
        check_jpeg_and_eval(runner, report, kind, s, base)
        run_bench(report, kind, args, work)
        print_table(runner)
    print(f"\n{sum(r[0] == 'PASS' for r in report.results)} PASS, {sum(r[0] == 'FAIL' for r in report.results)} "
          f"FAIL, {sum(r[0] == 'SKIP' for r in report.results)} SKIP in {time.time() - started:.0f} s")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
