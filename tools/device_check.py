"""Acceptance check for a machine with GPUs or NPUs: a PASS, FAIL or SKIP line per check as it ends, a table row
per main.py run as it ends, and the totals.

    tools/device_check.sh                        # the accelerator found, 2 processes if it has 2+ devices
    tools/device_check.sh --device cpu           # every check at CPU sizes, 2 gloo processes (a few minutes)
    tools/device_check.sh --device cpu --quick   # the same in miniature, 1 process (the tests run this)

Each check runs main.py as a user would (its own processes, --summary-json). In order of importance, which is
the order they run in; --budget-s takes each in turn that fits in what is left of it:

- amp-training: ``--amp`` on synthetic data (--dummy), seeded, --deterministic: the mean training loss of the last
  epoch is below the first's. With 2 processes also ``ddp``: every rank ends with the same weights digest.
- overflow-dynamic: ``--amp-dtype float16 --init-loss-scale 2^24``: fp16 gradients overflow at that scale, so the
  first steps are skipped while the scale halves; then steps apply. Skipped steps counted, the final scale
  2^24 / 2^skipped, finite weights.
- resume: the amp-training run again, stopped by SIGTERM a few steps into epoch 0 and resumed from its checkpoint,
  ends with the straight run's weights: bit for bit, since both run --deterministic. Should a kernel still differ
  between runs, the straight run is repeated once and the resumed run may differ by no more than that rerun does
  (both figures printed). With 2 processes also ``sigterm-workers``: the launcher's SIGTERM reached every rank.
- overflow-fixed: ``--loss-scale 2^24`` (fixed): overflowing steps are skipped and the scale stays 2^24.
- jpeg-pipeline: training on a generated JPEG folder holding a truncated file, random bytes named .JPEG and a JPEG
  with corrupt compressed data, through ``--pipeline gpu --fast-val`` (``fast`` on NPU): the run ends and counts
  the unreadable files (at least the two the workers' header check finds). With 2 processes also
  ``sharded-eval`` (every validation image scored once) and ``per-rank-logs`` (rank 1 logs to rank1.log).
- eval: ``-e`` on that run's checkpoint, fp32 (--tf32 off, --deterministic), with ``--no-fuse-bn`` and
  ``--fuse-bn``: the same Acc@1 and Acc@5 (within one image) and loss (relative 1e-3: folding BatchNorm rounds
  differently).
- bench: bench.py's step and input-pipeline rows (throughput, peak memory).
- eval-compile: ``-e --fuse-bn --compile`` agrees with eager likewise; SKIP without a C compiler and Python's headers.
- bench-e2e: bench.py's main.py end-to-end rows, sized so that steps are measured after the warm-up.

Exit status 1 when a check FAILs.
"""
import os
import sys
import time

STARTED = time.time()  # the budget counts the start-up too
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from training import autoload_off  # noqa: E402,F401  # isort: skip  (before torch, see training/autoload_off.py)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training import demo, devices, distributed  # noqa: E402

OVERFLOW_LOSS_SCALE = 2 ** 24
BENCH_WARMUP_STEPS = 5
# The checks, most important first; --budget-s drops from the end.
CHECKS = ("amp-training", "overflow-dynamic", "resume", "overflow-fixed", "jpeg-pipeline", "eval", "bench",
          "eval-compile", "bench-e2e")
# What a check also proves when its runs have 2+ processes.
MULTI_PROCESS_CHECKS = {"amp-training": ("ddp",), "resume": ("sigterm-workers",),
                        "jpeg-pipeline": ("sharded-eval", "per-rank-logs")}


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

    def count(self, status):
        return sum(result[0] == status for result in self.results)


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


def weights_difference(expected, actual):
    """(keys and integer tensors equal, relative difference of the float tensors together: ||a - e|| / ||e||)."""
    if expected.keys() != actual.keys():
        return False, math.inf
    floats = [key for key in expected if expected[key].is_floating_point()]
    ints_equal = all(torch.equal(expected[key], actual[key]) for key in expected if key not in floats)
    diff = math.sqrt(sum(float((actual[k].double() - expected[k].double()).pow(2).sum()) for k in floats))
    norm = math.sqrt(sum(float(expected[k].double().pow(2).sum()) for k in floats))
    return ints_equal, diff / norm if norm else diff


def resume_verdict(resumed, rerun=None):
    """(ok, detail) from weights_difference(straight, resumed) and, where measured, (straight, a rerun of it): a
    resumed run may differ from the straight one only as much as the same code differs from itself."""
    ints_equal, difference = resumed
    if ints_equal and difference == 0:
        return True, "bit-identical"
    if not ints_equal:
        return False, "different keys or integer buffers (step counts, BatchNorm batches)"
    if rerun is None:
        return False, f"relative difference {difference:.2e}, not bit-identical"
    noise = rerun[1] if rerun[0] else math.inf
    return difference <= 2 * noise, (f"relative difference {difference:.2e}; a rerun of the straight run differs "
                                      f"from it by {noise:.2e} (allowed: twice that)")


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


def dynamic_overflow_verdict(summary, scale):
    """(ok, detail): steps skipped, then applied, and the scale halved once per skipped step (no growth: fewer
    good steps than GradScaler's growth interval of 2000)."""
    skipped, steps = summary["skipped_steps"], summary["train_steps"]
    expected = OVERFLOW_LOSS_SCALE / 2 ** skipped
    ok = 1 <= skipped < steps and scale == expected and summary["train_loss"] is not None
    applied = "the rest applied" if skipped < steps else "none applied"
    return ok, (f"from {OVERFLOW_LOSS_SCALE}: {skipped} of {steps} steps skipped, {applied}; final scale "
                f"{scale:g} (expected {expected:g}), last epoch's loss {summary['train_loss']}")


def fixed_overflow_verdict(summary, scale):
    skipped, steps = summary["skipped_steps"], summary["train_steps"]
    ok = skipped >= 1 and scale == OVERFLOW_LOSS_SCALE
    return ok, f"fixed {OVERFLOW_LOSS_SCALE}: {skipped} of {steps} steps skipped, scale {scale:g} at the end"


def compiler_missing(kind):
    """Why torch.compile's inductor cannot build its kernels here (no C compiler or no Python.h), or None."""
    compilers = [os.environ.get("CC"), "cc", "gcc", "clang"]
    if not any(name and shutil.which(name) for name in compilers):
        return "no C compiler (cc, gcc or clang on PATH, or $CC)"
    if kind == "cpu" and not any(name and shutil.which(name) for name in (os.environ.get("CXX"), "c++", "g++",
                                                                          "clang++")):
        return "no C++ compiler (c++, g++ or clang++ on PATH, or $CXX)"
    headers = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(headers, "Python.h")):
        return f"no Python headers ({headers}/Python.h; install python3-dev)"
    return None


# --- running main.py ---

class Runner:
    """Runs main.py in folders of ``work``; prints a table row per run as it ends."""
    HEADER = f"{'run':<24} {'procs':>5} {'img/s':>9} {'ms/step':>8} {'peak device MB':>15} {'wall s':>7}"

    def __init__(self, work):
        self.work = work
        self.rows = []

    def command(self, name, flags):
        out = os.path.join(self.work, name)
        os.makedirs(out, exist_ok=True)
        return out, [sys.executable, os.path.join(ROOT, "main.py"), *flags, "--output-dir", out,
                     "--summary-json", os.path.join(out, "summary.json")]

    def run(self, name, flags, timeout, label=None):
        """main.py FLAGS in its own processes, in the folder NAME: (exit status, summary or None, stderr's tail);
        the table shows it as LABEL (default NAME). Exit status None: still running after ``timeout`` s, killed."""
        out, cmd = self.command(name, flags)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            code, err = None, f"{err}\nstill running after {timeout:.0f} s: killed"
        return code, self.summary(label or name, out), err[-1500:]

    def run_and_stop(self, name, flags, after_step, timeout, grace=120):
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
        if not self.rows:
            print(self.HEADER, flush=True)
        self.rows.append((label, summary))
        print(table_row(label, summary), flush=True)
        return summary

    def logs(self, name):
        """{file name: text} of the folder's .log files: rank 0's train.log, rank k's rank<k>.log."""
        folder = os.path.join(self.work, name)
        texts = {}
        for log_name in sorted(os.listdir(folder)):
            if log_name.endswith(".log"):
                with open(os.path.join(folder, log_name)) as handle:
                    texts[log_name] = handle.read()
        return texts


def table_row(label, summary):
    def number(key, width, digits):
        value = summary.get(key)
        return f"{value:{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
    return (f"{label:<24} {summary['world_size']:>5} {number('fps', 9, 1)} {number('step_time_ms', 8, 1)} "
            f"{number('peak_device_memory_mb', 15, 0)} {number('e2e_seconds', 7, 1)}")


def checkpoint_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def last_line(err):
    lines = err.strip().splitlines()
    return lines[-1] if lines else "(no output)"


def write_jpeg_folder(root, classes, train_per_class, val_per_class, size):
    """demo.write_striped_folder's classes (learnable in a few epochs), of which three training files and one
    validation file are then broken. Returns {what: path} of those."""
    colours = [(200, 40, 40), (40, 190, 60), (40, 60, 210), (200, 200, 40)][:classes]
    demo.write_striped_folder(root, {f"c{i}": colour for i, colour in enumerate(colours)}, train_per_class,
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


# --- sizes and the time plan ---

# Seconds to start main.py (Python, torch, the device, a process group) and per training step at the sizes below,
# then what the other work costs. CPU: from `--device cpu` runs here (2-core AMD EPYC VM, 2 gloo processes).
# GPU and NPU: not measured (no accelerator has run this yet); estimated from 2 x the CPU's process start-up plus
# device initialisation, and mnasnet1_0 at batch 64 x 224 px in fp16 at a tenth of a second per step (cuDNN's
# first-step autotuning included in the start-up). The run prints each check's measured time next to its estimate.
COSTS = {
    "cpu": dict(start=8.0, step=0.5, compile=40.0, bench=90.0, bench_e2e=90.0, jpeg_write=3.0),
    "cuda": dict(start=25.0, step=0.1, compile=150.0, bench=120.0, bench_e2e=120.0, jpeg_write=8.0),
    "npu": dict(start=40.0, step=0.1, compile=0.0, bench=150.0, bench_e2e=150.0, jpeg_write=8.0),
}


def settings(args, kind, count):
    """Sizes: a real model and crop on an accelerator, smaller on the CPU, the tests' miniature with --quick."""
    if args.quick:
        sizes = dict(arch="mnasnet0_5", crop=48, batch=8, steps=6, epochs=2, stop_at=2, overflow_steps=16,
                     jpeg_size=48, jpeg_train=8, jpeg_val=3, jpeg_epochs=2, compile="eager", workers=1, procs=1,
                     bench=None)
    elif kind == "cpu":
        sizes = dict(arch="mnasnet0_5", crop=64, batch=16, steps=8, epochs=2, stop_at=3, overflow_steps=16,
                     jpeg_size=64, jpeg_train=16, jpeg_val=4, jpeg_epochs=2, compile="inductor", workers=1, procs=2,
                     bench=dict(arch="mnasnet0_5", crop=64, train_batch=8, eval_batch=16, steps=2, repeats=1,
                                images=8, workers=1))
    else:
        procs = 2 if count >= 2 else 1
        sizes = dict(arch="mnasnet1_0", crop=224, batch=64 * procs, steps=24, epochs=3, stop_at=6,
                     overflow_steps=24, jpeg_size=256, jpeg_train=96, jpeg_val=24, jpeg_epochs=3, compile="inductor",
                     workers=None, procs=procs,
                     bench=dict(arch="mnasnet1_0", crop=224, train_batch=256, eval_batch=512, steps=20, repeats=3,
                                images=96, workers=8))
    if args.procs:
        sizes["procs"] = args.procs
    # The CPU trains in fp16 too (slow, but torch's own GradScaler then runs as on a GPU); --quick keeps --amp's
    # default there, as the overflow checks run fp16 anyway.
    sizes["amp_dtype"] = ["--amp-dtype", "float16"] if kind == "cpu" and not args.quick else []
    return sizes


def bench_e2e_images(bench):
    """Training images for bench.py's main.py rows: BENCH_WARMUP_STEPS warm-up steps and as many measured."""
    return 2 * BENCH_WARMUP_STEPS * bench["train_batch"]


def estimate_seconds(name, kind, s):
    """The estimated wall time of one check (see COSTS)."""
    cost = COSTS[kind]
    start = cost["start"] * (1.5 if s["procs"] > 1 else 1.0)
    jpeg_steps = s["jpeg_epochs"] * max(4 * s["jpeg_train"] // s["batch"], 1)
    return {
        "amp-training": start + s["epochs"] * s["steps"] * cost["step"],
        "overflow-dynamic": start + s["overflow_steps"] * cost["step"],
        "resume": 2 * start + s["epochs"] * s["steps"] * cost["step"],
        "overflow-fixed": start + 4 * cost["step"],
        "jpeg-pipeline": cost["jpeg_write"] + start + jpeg_steps * cost["step"],
        "eval": 2 * start,
        "bench": cost["bench"],
        "bench-e2e": cost["bench_e2e"],
        "eval-compile": start + cost["compile"],
    }[name]


def plan_checks(names, kind, s, budget):
    """(checks that fit the budget with their estimates, [(dropped check, reason)]): in order of importance, each
    check that still fits is taken, so the budget is spent on the most important ones."""
    planned, dropped, left = [], [], budget
    for name in (name for name in CHECKS if name in names):
        seconds = estimate_seconds(name, kind, s)
        if seconds <= left:
            planned.append((name, seconds))
            left -= seconds
        else:
            dropped.append((name, f"--budget-s {budget:g}: needs ~{seconds:.0f} s, ~{left:.0f} s left"))
    return planned, dropped


# --- the checks ---

def common_flags(kind, s):
    flags = ["-a", s["arch"], "--device", kind, "--train-crop-size", str(s["crop"]),
             "--val-crop-size", str(s["crop"]), "--val-resize-size", str(s["crop"] * 8 // 7), "--seed", "0",
             "--fps-warmup-steps", "2"]
    if s["workers"] is not None:
        flags += ["-j", str(s["workers"])]
    if s["procs"] > 1:
        flags += ["--multiprocessing-distributed", "--device-list", ",".join(map(str, range(s["procs"])))]
    return flags


class Checks:
    """Each check takes the seconds it may run and reports its own lines."""

    def __init__(self, runner, report, kind, s, args):
        self.runner, self.report, self.kind, self.s, self.args = runner, report, kind, s, args
        self.base = common_flags(kind, s)
        self.training = [*self.base, "--dummy", "--dummy-images", str(s["steps"] * s["batch"]), "-b",
                         str(s["batch"]), "--epochs", str(s["epochs"]), "--amp", "--deterministic", "--no-val",
                         "--print-freq", "1", *s["amp_dtype"]]
        self.ran = []
        self.evaluated = {}

    def fail_run(self, name, what, code, err):
        exit_text = "was killed (timed out)" if code is None else f"exited {code}"
        self.report.add("FAIL", name, f"{what}main.py {exit_text}: {last_line(err)}")

    def amp_training(self, timeout):
        code, straight, err = self.runner.run("amp-training", self.training, timeout)
        if code or straight is None:
            return self.fail_run("amp-training", "", code, err)
        ok, detail = loss_fell(straight["history"])
        self.report.check("amp-training", ok, f"{straight['world_size']} x {self.kind}, {detail}")
        if self.s["procs"] > 1:
            digests = {name: line.rsplit(" ", 1)[1] for name, text in self.runner.logs("amp-training").items()
                       for line in text.splitlines() if "weights sha256" in line}
            ok = len(digests) == self.s["procs"] and len(set(digests.values())) == 1
            self.report.check("ddp", ok, f"{self.s['procs']} processes over {distributed.BACKENDS[self.kind]}: weights "
                                         f"digests {sorted(set(digests.values()))[:2]} in {sorted(digests)}")

    def resume(self, timeout):
        straight_path = os.path.join(self.runner.work, "amp-training", "checkpoint.pth.tar")
        if not os.path.exists(straight_path):
            status = "FAIL" if "amp-training" in self.ran else "SKIP"
            return self.report.add(status, "resume", "no straight run (amp-training) to compare with")
        grace = min(120, timeout)
        code = self.runner.run_and_stop("resume", self.training, self.s["stop_at"], timeout, grace)
        path = os.path.join(self.runner.work, "resume", "checkpoint.pth.tar")
        exited = code == 128 + signal.SIGTERM
        if not os.path.exists(path):
            return self.report.add("FAIL", "resume", f"the run to interrupt exited {code}, and wrote no checkpoint")
        state = checkpoint_state(path)
        where = f"stopped at epoch {state['epoch']} step {state['step']}"
        if not exited:
            where += (f", BUT exited {code} (expected {128 + signal.SIGTERM})" if code is not None else
                      f", BUT still running {grace} s after SIGTERM (killed)")
        if self.s["procs"] > 1:
            stopped = [name for name, text in self.runner.logs("resume").items() if "stopped by SIGTERM" in text]
            self.report.check("sigterm-workers", exited and len(stopped) == self.s["procs"],
                              f"SIGTERM to the launcher: exit {code}, 'stopped by SIGTERM' in {stopped}")
        code, _, err = self.runner.run("resume", [*self.training, "--resume", path], timeout,
                                       label="resume (resumed)")
        if code:
            return self.fail_run("resume", f"{where}; the resumed ", code, err)
        expected = checkpoint_state(straight_path)["state_dict"]
        resumed = weights_difference(expected, checkpoint_state(path)["state_dict"])
        rerun = None
        if resumed != (True, 0.0) and resumed[0] and self.kind != "cpu":
            code, _, err = self.runner.run("amp-training-rerun", self.training, timeout)
            if code:
                return self.fail_run("resume", "the rerun of the straight run: ", code, err)
            rerun_path = os.path.join(self.runner.work, "amp-training-rerun", "checkpoint.pth.tar")
            rerun = weights_difference(expected, checkpoint_state(rerun_path)["state_dict"])
        ok, detail = resume_verdict(resumed, rerun)
        self.report.check("resume", ok and exited,
                          f"{where} ({'mid-epoch' if state['step'] else 'epoch boundary'}), resumed: {detail}")

    def overflow(self, name, scale_flags, steps, verdict, timeout):
        flags = [*self.base, "--dummy", "--dummy-images", str(steps * self.s["batch"]), "-b", str(self.s["batch"]),
                 "--epochs", "1", "--amp", "--amp-dtype", "float16", *scale_flags, "--no-val", "--print-freq", "1",
                 "--max-nonfinite-steps", str(steps + 1)]  # every step may overflow: the verdict judges
        code, summary, err = self.runner.run(name, flags, timeout)
        if code or summary is None:
            return self.fail_run(name, "", code, err)
        state = checkpoint_state(os.path.join(self.runner.work, name, "checkpoint.pth.tar"))
        finite, finite_detail = weights_finite(state["state_dict"])
        ok, detail = verdict(summary, float(state["precision"]["scaler"]["scale"]))
        self.report.check(name, ok and finite, f"{detail}; {finite_detail}")

    def overflow_dynamic(self, timeout):
        self.overflow("overflow-dynamic", ["--init-loss-scale", str(OVERFLOW_LOSS_SCALE)], self.s["overflow_steps"],
                      dynamic_overflow_verdict, timeout)

    def overflow_fixed(self, timeout):
        self.overflow("overflow-fixed", ["--loss-scale", str(OVERFLOW_LOSS_SCALE)], 4, fixed_overflow_verdict,
                      timeout)

    def jpeg_pipeline(self, timeout):
        s = self.s
        folder = os.path.join(self.runner.work, "jpegs")
        broken = write_jpeg_folder(folder, 4, s["jpeg_train"], s["jpeg_val"], s["jpeg_size"])
        name = "gpu" if self.kind != "npu" else "fast"
        flags = [*self.base, folder, "-b", str(s["batch"]), "--epochs", str(s["jpeg_epochs"]), "--pipeline", name,
                 "--fast-val", "--lr", "0.05", "--print-freq", "10"]
        code, summary, err = self.runner.run("jpeg-pipeline", flags, timeout)
        if code or summary is None:
            return self.fail_run("jpeg-pipeline", f"--pipeline {name}: ", code, err)
        # Each rank logs the files it met: rank 0 in train.log, the others in rank<k>.log.
        logs = self.runner.logs("jpeg-pipeline")
        log = "".join(logs.values())
        logged = [what for what, path in broken.items() if f"skipped unreadable image {path}" in log]
        train_broken = [what for what in broken if not what.startswith("val")]
        val_images = 4 * s["jpeg_val"] - 1
        # The workers' header check finds the truncated file and the random bytes; the corrupt scan is the
        # decoder's (nvJPEG may decode some corrupt data without an error).
        ok = ({"truncated", "random bytes", "val random bytes"} <= set(logged)
              and summary["train_skipped_images"] == sum(what in logged for what in train_broken)
              and summary["val_skipped_images"] == 1 and summary["val_images"] == val_images)
        self.report.check("jpeg-pipeline", ok,
                          f"--pipeline {name}: logged {', '.join(logged) or 'none'}; counted "
                          f"{summary['train_skipped_images']} in training, {summary['val_skipped_images']} in "
                          f"validation; val Acc@1 {summary['val_acc1']:.1f} (chance 25), {summary['fps']:.0f} img/s")
        if s["procs"] > 1:
            self.report.check("sharded-eval", summary["val_images"] == val_images,
                              f"{s['procs']} ranks scored {summary['val_images']} of {val_images} readable "
                              "validation images (each once)")
            rank_logs = [f"rank{rank}.log" for rank in range(1, s["procs"])]
            ok = all("Epoch: [0]" in logs.get(log_name, "") for log_name in rank_logs)
            self.report.check("per-rank-logs", ok, f"{', '.join(rank_logs)} beside train.log, each with its "
                                                   f"rank's steps: {sorted(logs)}")

    def evaluate(self, name, variants, timeout):
        """{variant: -e summary} for {variant: extra flags}, or None after a FAIL line."""
        weights = os.path.join(self.runner.work, "jpeg-pipeline", "checkpoint.pth.tar")
        if not os.path.exists(weights):
            status = "FAIL" if "jpeg-pipeline" in self.ran else "SKIP"
            self.report.add(status, name, "no jpeg-pipeline checkpoint to evaluate")
            return None
        folder = os.path.join(self.runner.work, "jpegs")
        # fp32 without TF32 and deterministic kernels: the variants differ only where BatchNorm is folded.
        flags = [*self.base, folder, "-b", str(self.s["batch"]), "-e", "--resume", weights, "--print-freq", "1000",
                 "--tf32", "off", "--deterministic"]
        results = {}
        for variant, extra in variants.items():
            if variant in self.evaluated:  # eval's eager run serves eval-compile too
                results[variant] = self.evaluated[variant]
                continue
            code, summary, err = self.runner.run(f"eval-{variant.split('(')[0]}", [*flags, *extra], timeout)
            if code or summary is None:
                self.fail_run(name, f"-e {' '.join(extra)}: ", code, err)
                return None
            results[variant] = self.evaluated[variant] = summary
        return results

    def eval(self, timeout):
        results = self.evaluate("eval", {"eager": ["--no-fuse-bn"], "fuse-bn": ["--fuse-bn"]}, timeout)
        if results is not None:
            self.report.check("eval", *evaluations_agree(results))

    def eval_compile(self, timeout):
        missing = compiler_missing(self.kind) if self.s["compile"] == "inductor" else None
        if missing:
            return self.report.add("SKIP", "eval-compile", f"--compile {self.s['compile']}: {missing}")
        results = self.evaluate("eval-compile", {"eager": ["--no-fuse-bn"],
                                 f"fuse-bn+compile({self.s['compile']})": ["--fuse-bn", "--compile",
                                                                           self.s["compile"]]}, timeout)
        if results is not None:
            self.report.check("eval-compile", *evaluations_agree(results))

    def bench(self, timeout, e2e=False):
        name = "bench-e2e" if e2e else "bench"
        b = self.s["bench"]
        json_path = os.path.join(self.runner.work, f"{name}.json")
        cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--device", self.kind, "--amp", "-a", b["arch"],
               "--crop", str(b["crop"]), "--train-batch", str(b["train_batch"]), "--eval-batch", str(b["eval_batch"]),
               "--steps", str(b["steps"]), "--warmup-steps", str(BENCH_WARMUP_STEPS), "--repeats", str(b["repeats"]),
               "--images", str(b["images"]), "--e2e-images", str(bench_e2e_images(b)), "--workers",
               str(b["workers"]), "--json", json_path, "--skip", *(["pipeline", "step"] if e2e else ["e2e"])]
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return self.report.add("FAIL", name, f"bench.py still running after {timeout:.0f} s: killed")
        print(done.stdout, flush=True)
        self.report.check(name, done.returncode == 0,
                          f"bench.py exited {done.returncode}" + (f": {last_line(done.stderr)}" if done.returncode
                                                                 else f", JSON in {json_path}"))

    def run(self, name, timeout):
        if name in ("bench", "bench-e2e") and self.s["bench"] is None:
            return self.report.add("SKIP", name, "--quick")
        method = {"amp-training": self.amp_training, "overflow-dynamic": self.overflow_dynamic,
                  "resume": self.resume, "overflow-fixed": self.overflow_fixed, "jpeg-pipeline": self.jpeg_pipeline,
                  "eval": self.eval, "bench": self.bench, "bench-e2e": lambda t: self.bench(t, e2e=True),
                  "eval-compile": self.eval_compile}[name]
        self.ran.append(name)
        method(timeout)
        if self.s["procs"] == 1:
            for multi_process_check in MULTI_PROCESS_CHECKS.get(name, ()):
                self.report.add("SKIP", multi_process_check, "one process: needs 2+ devices (--procs 2)")


def device_description(kind):
    if kind == "cpu":
        import platform
        return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    module = getattr(torch, kind)
    names = sorted({module.get_device_name(i) for i in range(module.device_count())})
    return f"{module.device_count()} x {', '.join(names)}"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "npu", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="miniature sizes, one process (the CPU smoke test)")
    parser.add_argument("--procs", type=int, default=None,
                        help="processes per run (default: 2 with 2+ devices and on the CPU, 1 with --quick)")
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help="comma-separated checks to run (default: all, in the order above)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-time budget in seconds: checks whose estimate does not fit are SKIPped, the "
                             "least important first, before and while running")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    args.checks = [name.strip() for name in args.checks.split(",") if name.strip()]
    unknown = sorted(set(args.checks) - set(CHECKS))
    if unknown:
        parser.error(f"--checks: unknown {', '.join(unknown)} (known: {', '.join(CHECKS)})")
    if args.procs is not None and args.procs < 1:
        parser.error("--procs must be at least 1")
    return args


def main(argv=None, started=None):
    started = started or STARTED
    args = parse_args(argv)
    kind = devices.resolve_device_kind(args.device)
    s = settings(args, kind, devices.device_count(kind))
    print(f"device check: {device_description(kind)}, torch {torch.__version__}, {s['procs']} process(es) per run",
          flush=True)
    planned, dropped = plan_checks(args.checks, kind, s, args.budget_s)
    print(f"plan: {', '.join(f'{name} ~{seconds:.0f} s' for name, seconds in planned)}; estimated "
          f"{sum(seconds for _, seconds in planned):.0f} s of --budget-s {args.budget_s:g}", flush=True)
    report = Report()
    for name, reason in dropped:
        report.add("SKIP", name, reason)
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = args.keep or tmp
        checks = Checks(Runner(work), report, kind, s, args)
        for name, estimate in planned:
            left = args.budget_s - (time.time() - started)
            if estimate > left:
                report.add("SKIP", name, f"--budget-s {args.budget_s:g}: ~{estimate:.0f} s needed, {left:.0f} s left")
                continue
            check_start = time.time()
            # A check may overrun its estimate fourfold (at least 2 minutes), never the budget: a hang is cut
            # off, not waited out.
            checks.run(name, timeout=max(min(max(4 * estimate, 120.0), left), 1.0))
            print(f"  ({name}: {time.time() - check_start:.0f} s, estimated {estimate:.0f} s)", flush=True)
    print(f"\n{report.count('PASS')} PASS, {report.count('FAIL')} FAIL, {report.count('SKIP')} SKIP in "
          f"{time.time() - started:.0f} s", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
