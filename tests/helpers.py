"""What the test modules share besides fixtures (those are in conftest.py): the checkout, tiny runs of main.py in
this process or in a child one, the launchers, models and weights to compare, and stand-ins for parts of a run.
Test modules take what they share from here and from conftest.py, not from each other."""
import argparse
import collections
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The commands (main.py, mnasnet.py, ...) and the training package import from this checkout, not an installed copy.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # tools/device_check.py and tools/onnx_to_om.py, imported by their tests

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import main  # noqa: E402
from training import demo, distributed  # noqa: E402

# --- data and flags ---

# Each class is a colour with a stripe orientation: learnable in a few steps, not by chance.
CLASS_COLOURS = {"n01_red": (200, 40, 40), "n02_green": (40, 190, 60), "n03_blue": (40, 60, 210)}


def write_image_folder(root, train_per_class=12, val_per_class=5, size=40, seed=0, classes=CLASS_COLOURS):
    return demo.write_striped_folder(root, classes, train_per_class, val_per_class, size, seed=seed)


def tiny_flags(output_dir, *extra):
    """The smallest sensible run: mnasnet0_5 at 48 px (a 2x2 final feature map), CPU, no workers.

    BatchNorm momentum 0.3, so that a few dozen steps move the running statistics that validation uses.
    """
    return ["-a", "mnasnet0_5", "--device", "cpu", "-j", "0", "--train-crop-size", "48", "--val-resize-size", "52",
            "--val-crop-size", "48", "-b", "8", "--lr", "0.01", "--wd", "1e-5", "--bn-momentum", "0.3",
            "--min-crop-scale", "0.5", "--print-freq", "2",
            "--fps-warmup-steps", "1", "--output-dir", str(output_dir), *extra]


# --- main.py runs ---

def run_main_in_process(*argv):
    """main.main in this process (argv names --output-dir); returns the summary JSON."""
    summary_path = Path(argv[argv.index("--output-dir") + 1]) / "summary.json"
    main.main([*argv, "--summary-json", str(summary_path)])
    return json.loads(summary_path.read_text())


def run_main_subprocess(*argv, env=None, timeout=300):
    """main.py in a child interpreter, with ``env`` (default: this process's); returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *argv], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def expect_error(capsys, argv, *fragments):
    """main.main(argv) in this process stops with exit status 2 and a one-line error (or a usage message) holding
    every fragment; returns the error."""
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 or err.startswith("usage:"), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def logged_digest(log_path, rank):
    """The weights digest that rank wrote into its log at the end of the run."""
    match = re.search(rf"=> rank {rank} weights sha256 ([0-9a-f]{{64}})", log_path.read_text())
    assert match, log_path.read_text()
    return match.group(1)


# --- child processes' environment ---

LAUNCHER_VARIABLES = (*distributed.TORCHRUN_VARIABLES, "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra):
    """This process's environment as a child main.py should see it when a user starts it by hand, with ``extra``
    added: no launcher's variables (torchrun's, SLURM_*, MASTER_*), which would make it a rank of some job; no CANN
    (ASCEND*), stand-in torch_npu (FAKE_NPU*) or plugin autoloading (TORCH_DEVICE_BACKEND*) settings, which decide
    how it finds an NPU; one thread per process, as in the tests."""
    dropped = ("SLURM_", "ASCEND", "FAKE_NPU", "TORCH_DEVICE_BACKEND")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped) and k not in LAUNCHER_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


# --- the test/*.sh launchers ---

NETWORK = "MnasNet_for_PyTorch"
# Small and fast: the launchers pass these on to main.py after their own flags, so they win.
TINY = ["--", "--arch", "mnasnet0_5", "--train-crop-size", "64", "--val-resize-size", "72",
        "--val-crop-size", "64", "--print-freq", "1", "--seed", "0"]
# The launchers run main.py with this interpreter. One thread per process: OpenMP threads spinning on a
# busy 2-core machine make steps 100x slower.
LAUNCH_ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def launch(script, *args, timeout=180, env=None):
    """A test/*.sh launcher run to its end, in ``env`` (default LAUNCH_ENV)."""
    return subprocess.run(["bash", str(ROOT / "test" / script), *args], cwd=ROOT, env=env or LAUNCH_ENV,
                          capture_output=True, text=True, timeout=timeout)


def launch_ok(script, *args, env=None):
    """The finished launch, with ``wall_seconds``: how long the test waited for it."""
    start = time.perf_counter()
    result = launch(script, *args, env=env)
    result.wall_seconds = time.perf_counter() - start
    assert result.returncode == 0, f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def read_case(out_dir, case_name):
    """The Key = value summary file and main.py's summary JSON of one run."""
    fields = dict(line.split(" = ", 1) for line in (out_dir / f"{case_name}.log").read_text().splitlines())
    summary = json.loads((out_dir / f"{case_name}.json").read_text())
    return fields, summary


# --- models and weights ---

NON_UNIT_ARCHS = ["mnasnet0_5", "mnasnet0_75", "mnasnet1_3"]


def randomize(model, seed=0):
    """Move every parameter and BN statistic off its init, so eval outputs depend on all of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.uniform_(-0.1, 0.1, generator=gen)
                module.running_mean.uniform_(-0.1, 0.1, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(torch.empty_like(module.weight).uniform_(0.5, 1.5, generator=gen))
    return model


def assert_same_state(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def v1_checkpoint(arch, **kwargs):
    """A version-1 state dict made by torchvision itself (``kwargs`` go to its builder).

    Loading a version-1-tagged dict without the stem keys makes torchvision rebuild its v1 stem,
    after which its state_dict() is a genuine v1 checkpoint.
    """
    model = getattr(torchvision.models, arch)(**kwargs)
    current = model.state_dict()
    v1_prefixes = tuple(f"layers.{i}." for i in range(9))
    partial = type(current)((k, v) for k, v in current.items() if not k.startswith(v1_prefixes))
    partial._metadata = copy.deepcopy(current._metadata)
    partial._metadata[""]["version"] = 1
    with pytest.warns(UserWarning):
        model.load_state_dict(partial, strict=False)
    state = randomize(model, seed=1).state_dict()
    assert state._metadata[""]["version"] == 1
    return state


def onnx_matches_torch(onnx_path, model, size):
    """onnxruntime's outputs equal the model's for batches of 1 and 4 at size x size."""
    import onnxruntime  # only the export tests need it, and it takes a quarter of a second to import
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):  # the batch axis is dynamic
        images = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            expected = model(images).numpy()
        (actual,) = session.run(None, {"input": images.numpy()})
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


class ConvolutionDtypes(TorchDispatchMode):
    """Records each convolution that runs, forward and backward, below autocast (so after its casts):
    (pass, depthwise, dtype of the input or output gradient, dtype of the weight)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.calls["forward", args[8] > 1, args[0].dtype, args[1].dtype] += 1
        elif func is torch.ops.aten.convolution_backward.default:
            self.calls["backward", args[9] > 1, args[0].dtype, args[2].dtype] += 1
        return func(*args, **(kwargs or {}))


# --- parts of a run ---

def cpu_runtime(memory_format=torch.channels_last):
    return distributed.Runtime("cpu", torch.device("cpu"), memory_format=memory_format)


def device_args(**values):
    """The parsed flags that distributed.setup_runtime and devices.apply_kernel_settings read, with ``values``."""
    base = dict(device_kind="cuda", device_ids=[0], multiprocessing_distributed=False, world_size=1, rank=0,
                dist_url="env://", dist_backend=None, dist_timeout=60, memory_format="auto", npu_jit_compile="auto",
                npu_internal_format="auto", tf32="auto", deterministic=False)
    return argparse.Namespace(**{**base, **values})


def poison_loss(monkeypatch, bad_steps):
    """The training loss is NaN at the given (1-based) training steps of the run."""
    original = torch.nn.CrossEntropyLoss.forward
    calls = []

    def forward(self, output, target):
        loss = original(self, output, target)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) in bad_steps:
                return loss * float("nan")
        return loss
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward)


# --- files and processes the tests make ---

def write_jpeg(path, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return str(path)


def write_truncated_jpeg(path):
    write_jpeg(path)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    return str(path)


def write_random_bytes(path):
    """Random bytes under a .JPEG name."""
    with open(path, "wb") as handle:
        handle.write(np.random.default_rng(1).integers(0, 256, 700, dtype=np.uint8).tobytes())
    return str(path)


def write_jpeg_with_corrupt_scan(path):
    """A whole JPEG (header, end marker) whose compressed data holds a marker libjpeg refuses: it passes the
    workers' header check and fails only when decoded."""
    write_jpeg(path)
    raw = open(path, "rb").read()
    sos = raw.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(raw[sos + 2:sos + 4], "big")
    with open(path, "wb") as handle:
        handle.write(raw[:scan] + b"\xff\x40" + raw[scan:])
    return str(path)


# A torch_npu distribution that registers the wheel's torch.backends entry point and, like the real one without
# CANN's environment, cannot load (tests/standins/torch_npu_site/torch_npu/__init__.py).
BROKEN_NPU_SITE = os.path.join(ROOT, "tests", "standins", "torch_npu_site")

# One step of a dummy run: for tests of how a run starts.
ONE_STEP = ["--dummy", "--dummy-images", "16", "-a", "mnasnet0_5", "-j", "0", "--train-crop-size", "48",
            "--val-resize-size", "52", "--val-crop-size", "48", "-b", "8", "--epochs", "1", "--max-steps", "1",
            "--no-val", "--no-checkpoint"]


def wait_for_text(path, text, proc, timeout=120):
    """Wait until the file at ``path`` holds ``text``; fails if ``proc`` ends first or ``timeout`` passes."""
    start = time.time()
    while not (os.path.exists(path) and text in open(path).read()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout, f"no {text!r} in {path}"
        time.sleep(0.2)


def popen_main(*argv, env=None):
    """main.py in a child process of a session of its own: a process group to signal as a terminal's Ctrl-C does."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)


def scaler_state(path):
    """The loss scaler's state in a checkpoint."""
    return torch.load(path, weights_only=True)["precision"]["scaler"]


def without(flags, *names):
    """``flags`` without the given options and their values."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in names:
            skip = True
        else:
            kept.append(flag)
    return kept
