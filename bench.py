"""Throughput benchmark (not a test): prints one table and writes it as JSON.

    python bench.py                        # CPU defaults: a few minutes on 2 cores
    python bench.py --device cuda --amp --train-batch 256 --eval-batch 512 --steps 20

1. input pipeline: images/s of one worker (one thread) per decode option, on generated photo-like JPEGs
   (300-500 px, one in eight 1000-2000 px, as ImageNet);
2. training and eval step images/s on synthetic batches: ours (channels_last where the device layer picks it,
   no per-step host sync, BatchNorm folded for eval, bf16 eval with --amp on CPU, and eval compiled with frozen
   weights as ``main.py -e --compile`` runs it) against a plain loop (NCHW, ``.item()`` every step), interleaved
   in one process so that both see the same machine load; the ratio of medians;
3. end to end: main.py on a generated image folder, training and ``-e`` evaluation, ours vs plain flags;
4. peak RSS (this process, and the largest main.py process) and peak device memory.

Run as a script, it re-executes itself under tcmalloc or jemalloc when one is installed (see
``preload_fast_allocator``).
"""
from training import autoload_off  # noqa: F401  # isort: skip  (before torch: see training/autoload_off.py)

import argparse
import copy
import ctypes.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import mnasnet
from training import devices, distributed, engine, transforms
from training.meters import MetricSums
from training.precision import NativeAmp, Precision

ROOT = os.path.dirname(os.path.abspath(__file__))


def photo(width, height, rng):
    """Smooth gradients, a few shapes with edges and sensor-like noise: JPEG sizes and decode cost like photos."""
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    f = rng.uniform(2, 8, 6)
    pixels = np.stack([128 + 90 * np.sin(f[0] * x + f[1] * y), 120 + 80 * np.cos(f[2] * y + f[3] * x),
                       60 + 150 * x * y + 40 * np.sin(f[4] * x * y * 6)], axis=2)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        pixels[((x - cx) ** 2 + (y - cy) ** 2) < r * r] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 8, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_jpegs(folder, count, seed, classes=1):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        big = i % 8 == 7
        width, height = rng.integers(1000, 2000, 2) if big else rng.integers(300, 500, 2)
        sub = os.path.join(folder, f"c{i % classes}")
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"{i}.JPEG")
        photo(int(width), int(height), rng).save(path, quality=90)
        paths.append(path)
    return paths


def interleaved(runs, repeats):
    """{name: median of fn()} with the runs taken in turn, so that load changes hit every option alike."""
    results = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            results[name].append(fn())
    return {name: statistics.median(values) for name, values in results.items()}


def pipeline_rates(paths, args):
    crop, resize = args.crop, args.crop * 8 // 7
    standard_train = transforms.train_transform(crop)
    standard_val = transforms.val_transform(resize, crop)
    options = {
        "train standard (PIL, ToTensor, Normalize)": lambda p: standard_train(Image.open(p).convert("RGB")),
        "train PIL, uint8 out": transforms.FastTrain(crop, draft=False, small="pil"),
        "train PIL draft(), uint8 out": transforms.FastTrain(crop, small="pil"),
        "train torchvision.io + tensor ops": transforms.TensorTrain(crop),
        "train fast (draft() large, torchvision.io small)": transforms.FastTrain(crop),
        "val standard (PIL, ToTensor, Normalize)": lambda p: standard_val(Image.open(p).convert("RGB")),
        "val standard pixels, uint8 out": transforms.FastVal(resize, crop),
        "val fast (--fast-val)": transforms.FastVal(resize, crop, fast=True),
    }

    def timed(fn):
        def run():
            start = time.perf_counter()
            for path in paths:
                fn(path)
            return len(paths) / (time.perf_counter() - start)
        return run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        return interleaved({name: timed(fn) for name, fn in options.items()}, args.repeats)
    finally:
        torch.set_num_threads(threads)


def step_rates(runtime, args):
    """Synthetic training and eval images/s: plain loops vs ours, on the same weights and batches."""
    dev = runtime.device
    torch.manual_seed(0)
    model = mnasnet.ARCHS[args.arch]().to(dev)
    criterion = nn.CrossEntropyLoss()
    train_x = torch.randn(args.train_batch, 3, args.crop, args.crop, device=dev)
    train_y = torch.randint(1000, (args.train_batch,), device=dev)
    eval_x = torch.randn(args.eval_batch, 3, args.crop, args.crop, device=dev)
    eval_y = torch.randint(1000, (args.eval_batch,), device=dev)
    amp = NativeAmp(runtime.kind, "dynamic")
    fp32 = Precision()

    def train(memory_format, precision, host_sync, compiled=False, prepare=True):
        net = copy.deepcopy(model).to(memory_format=memory_format)
        net = precision.prepare(net) if prepare else net
        net = torch.compile(net, backend=args.compile_backend) if compiled else net
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
        x = train_x.contiguous(memory_format=memory_format)
        sums = MetricSums(dev)
        net.train()

        def run(steps=args.steps):
            runtime.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                with precision.autocast():
                    output = net(x)
                    loss = criterion(output, train_y)
                precision.step(loss, optimizer)
                if host_sync:
                    loss.item()
                else:
                    sums.update(loss, output, train_y)
            sums.pull()
            runtime.synchronize()
            return steps * args.train_batch / (time.perf_counter() - start)
        run(args.warmup_steps)  # oneDNN primitives, allocator caches, compilation: the first steps are slow
        return run

    def evaluate(memory_format, autocast, fuse_bn=False, compile_backend=None):
        x = eval_x.contiguous(memory_format=memory_format)
        net = engine.inference_model(copy.deepcopy(model).to(memory_format=memory_format).eval(), fuse_bn,
                                     compile_backend)

        @torch.no_grad()
        def run(steps=args.steps):
            runtime.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                with autocast():
                    output = net(x)
                    loss = criterion(output, eval_y)
                loss.item()
            runtime.synchronize()
            return steps * args.eval_batch / (time.perf_counter() - start)
        run(args.warmup_steps)
        return run

    plain_precision = amp if args.amp and runtime.kind != "cpu" else fp32
    ours_precision = amp if args.amp else fp32
    nchw, ours_format = torch.contiguous_format, runtime.memory_format
    runs = {
        "train plain (NCHW, .item() each step)": train(nchw, plain_precision, True),
        "train ours": train(ours_format, ours_precision, False),
    }
    if args.amp and runtime.kind == "cpu":
        runs["train ours without --amp (fp32)"] = train(ours_format, fp32, False)
        # What --amp would train in without NativeAmp.prepare: every layer bf16.
        runs["train ours, bf16 in every layer (not used)"] = train(ours_format, ours_precision, False, prepare=False)
    if args.compile:
        runs["train ours + torch.compile"] = train(ours_format, ours_precision, False, compiled=True)
    runs["eval plain (NCHW fp32)"] = evaluate(nchw, fp32.autocast)
    runs["eval ours fp32"] = evaluate(ours_format, fp32.autocast, fuse_bn=True)
    if args.amp:
        runs["eval ours --amp"] = evaluate(ours_format, amp.eval_autocast, fuse_bn=True)
    ours_autocast = amp.eval_autocast if args.amp else fp32.autocast
    runs[f"eval ours{' --amp' if args.amp else ''} --compile"] = evaluate(ours_format, ours_autocast, fuse_bn=True,
                                                                        compile_backend=args.compile_backend)
    return interleaved(runs, args.repeats)


def end_to_end(folder, args, tmp):
    """main.py training then ``-e`` evaluation on a generated folder, with our defaults and with plain flags."""
    flags = ["-a", args.arch, "--device", args.device, "-b", str(args.train_batch), "--epochs", "1",
             "--train-crop-size", str(args.crop), "--val-crop-size", str(args.crop),
             "--val-resize-size", str(args.crop * 8 // 7), "-j", str(args.workers), "--print-freq", "1000",
             "--fps-warmup-steps", str(args.warmup_steps)]
    variants = {"ours": ["--amp"] if args.amp else [],
                "plain": ["--pipeline", "standard", "--memory-format", "contiguous", "--no-fuse-bn"]}
    # Ours runs as the test/ launchers run it (with a fast allocator where one is installed), plain without one.
    allocator = fast_allocator() if args.device == "cpu" else None
    environments = {"ours": {**os.environ, "LD_PRELOAD": allocator} if allocator else dict(os.environ),
                    "plain": {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}}
    rows = {}
    for name, extra in variants.items():
        out = os.path.join(tmp, f"e2e-{name}")
        train_json, eval_json = os.path.join(out, "train.json"), os.path.join(out, "eval.json")
        rss = []
        for argv in ([*flags, *extra, "--no-val", "--output-dir", out, "--summary-json", train_json],
                     [*flags, *extra, "-e", "--pretrained", os.path.join(out, "checkpoint.pth.tar"),
                      "-b", str(args.eval_batch), "--output-dir", out, "--summary-json", eval_json]):
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report ours.
            code = ("import runpy, sys; sys.argv = ['main.py'] + sys.argv[1:]; "
                    "runpy.run_path('main.py', run_name='__main__')\n"
                    "print('MAXRSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
            cmd = [sys.executable, "-c", code, folder, *argv]
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=environments[name])
            if done.returncode:
                raise SystemExit(f"main.py failed: {' '.join(argv)}\n{done.stderr[-2000:]}")
            wall = time.perf_counter() - start
            rss.append(max(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("MAXRSS")))
        with open(train_json) as f:
            train = json.load(f)
        with open(eval_json) as f:
            evaluation = json.load(f)
        # train_img_s is None when every step was a warm-up step (--e2e-images too few for --warmup-steps).
        rows[name] = {"ld_preload": environments[name].get("LD_PRELOAD", ""), "train_img_s": train["fps"],
                      "train_steps": train["train_steps"], "measured_steps": train["measured_steps"],
                      "eval_img_s": evaluation["val_images"] / evaluation["e2e_seconds"],
                      "eval_wall_s": wall, "peak_rss_mb": max(rss) / 1024,
                      "peak_device_mb": train["peak_device_memory_mb"]}
    return rows


def fast_allocator():
    """tcmalloc or jemalloc, as test/common.sh looks for them; None when neither is installed."""
    for name in ("tcmalloc_minimal", "tcmalloc", "jemalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def load_average():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "npu"])
    parser.add_argument("-a", "--arch", default="mnasnet1_0", choices=sorted(mnasnet.ARCHS))
    parser.add_argument("--crop", default=224, type=int)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true",
                        help="add a torch.compile training row (minutes to compile on a small CPU; the compiled "
                             "eval row is always there)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for those rows")
    parser.add_argument("--train-batch", default=32, type=int)
    parser.add_argument("--eval-batch", default=64, type=int)
    parser.add_argument("--steps", default=3, type=int, help="timed steps per repeat")
    parser.add_argument("--warmup-steps", default=3, type=int,
                        help="untimed steps first (on a CPU the first 2-3 run at a fraction of the steady speed)")
    parser.add_argument("--repeats", default=3, type=int)
    parser.add_argument("--images", default=48, type=int, help="generated JPEGs for the pipeline rows")
    parser.add_argument("--e2e-images", default=256, type=int, help="training images for main.py (val: 1/2)")
    parser.add_argument("--workers", default=1, type=int, help="main.py loader workers")
    parser.add_argument("--threads", default=None, type=int,
                        help="intra-op threads for the step rows and main.py (default: torch's); on a machine shared "
                             "with other jobs, 1 keeps OpenMP threads from waiting on descheduled peers")
    parser.add_argument("--skip", nargs="*", default=[], choices=["pipeline", "step", "e2e"])
    parser.add_argument("--json", default="bench.json")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the main.py runs
    kind = devices.resolve_device_kind(args.device)
    dev = torch.device(kind) if kind == "cpu" else torch.device(kind, 0)
    runtime = distributed.Runtime(kind, dev, memory_format=devices.memory_format("auto", kind))
    result = {"machine": {"platform": platform.platform(), "cpu": platform.processor(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "ld_preload": os.environ.get("LD_PRELOAD", ""), "device": str(dev),
                          "load_average_start": load_average()},
              "config": vars(args)}
    started = time.perf_counter()

    def progress(what):
        print(f"[{time.perf_counter() - started:6.0f} s] {what}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="mnasnet-bench-") as tmp:
        if "pipeline" not in args.skip:
            paths = write_jpegs(os.path.join(tmp, "jpegs"), args.images, seed=0)
            result["pipeline_img_s_per_worker"] = pipeline_rates(paths, args)
            progress("input pipeline done")
        if "step" not in args.skip:
            result["step_img_s"] = step_rates(runtime, args)
            progress("steps done")
        if "e2e" not in args.skip:
            folder = os.path.join(tmp, "folder")
            write_jpegs(os.path.join(folder, "train"), args.e2e_images, seed=1, classes=4)
            write_jpegs(os.path.join(folder, "val"), args.e2e_images // 2, seed=2, classes=4)
            result["end_to_end"] = end_to_end(folder, args, tmp)
            progress("main.py end to end done")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = runtime.max_memory_allocated()
    result["peak_device_mb"] = peak / 2 ** 20 if peak is not None else None
    result["machine"]["load_average_end"] = load_average()
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)


def print_table(result):
    rows = []

    def section(title, rates, baseline):
        for name, value in rates.items():
            rows.append((title, name, f"{value:,.1f}", f"{value / rates[baseline]:.2f}x"))

    if "pipeline_img_s_per_worker" in result:
        rates = result["pipeline_img_s_per_worker"]
        section("pipeline img/s/worker", {k: v for k, v in rates.items() if k.startswith("train")},
                "train standard (PIL, ToTensor, Normalize)")
        section("pipeline img/s/worker", {k: v for k, v in rates.items() if k.startswith("val")},
                "val standard (PIL, ToTensor, Normalize)")
    if "step_img_s" in result:
        rates = result["step_img_s"]
        section("step img/s", {k: v for k, v in rates.items() if k.startswith("train")},
                "train plain (NCHW, .item() each step)")
        section("step img/s", {k: v for k, v in rates.items() if k.startswith("eval")}, "eval plain (NCHW fp32)")
    for name, row in result.get("end_to_end", {}).items():
        plain = result["end_to_end"]["plain"]
        rows.append(("main.py", f"{name}: LD_PRELOAD", row["ld_preload"] or "-", ""))
        if row["train_img_s"] is None:
            rows.append(("main.py", f"{name}: train img/s",
                         f"no measured step ({row['train_steps']} steps, all warm-up)", ""))
        else:
            ratio = f"{row['train_img_s'] / plain['train_img_s']:.2f}x" if plain["train_img_s"] else ""
            rows.append(("main.py", f"{name}: train img/s", f"{row['train_img_s']:,.1f}", ratio))
        rows.append(("main.py", f"{name}: eval img/s (-e, incl. start-up)", f"{row['eval_img_s']:,.1f}",
                     f"{row['eval_img_s'] / plain['eval_img_s']:.2f}x"))
        rows.append(("main.py", f"{name}: peak RSS MB (main process)", f"{row['peak_rss_mb']:,.0f}", ""))
    rows.append(("bench", "peak RSS MB", f"{result['peak_rss_mb']:,.0f}", ""))
    if result["peak_device_mb"] is not None:
        rows.append(("bench", "peak device memory MB", f"{result['peak_device_mb']:,.0f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    machine = result["machine"]
    print(f"# {machine['cpu'] or machine['platform']}, {machine['cpus']} CPUs, {machine['device']}, "
          f"torch {machine['torch']}, {machine['threads']} threads, LD_PRELOAD={machine['ld_preload'] or '-'}, "
          f"load average {machine['load_average_start']} -> {machine['load_average_end']}")
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def preload_fast_allocator():
    """Run this benchmark under tcmalloc or jemalloc (re-executing itself), as the test/ launchers run main.py.

    Both loops of a step row share this process's allocator. glibc's, with several models' activations
    interleaved, unmaps and faults in tens of MB per step in a pattern that depends on the order of the rows
    (the plain training loop measured 16.6 img/s here in-process, 21-22 in a process of its own), so rows under
    glibc compare the allocator's luck as much as the loops. The main.py plain rows still run without it.
    """
    allocator = fast_allocator()
    if allocator and allocator not in os.environ.get("LD_PRELOAD", ""):
        preload = ":".join(filter(None, [allocator, os.environ.get("LD_PRELOAD")]))
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "LD_PRELOAD": preload})


if __name__ == "__main__":
    preload_fast_allocator()
    main()
