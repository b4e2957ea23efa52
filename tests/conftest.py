import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tests share two cores with loader workers and with each other's processes; OpenMP threads that spin
# on a busy core make every step 10-100x slower, so every test process uses one thread.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

import data  # noqa: E402

torch.set_num_threads(1)

# Each class is a colour with a stripe orientation: learnable in a few steps, not by chance.
CLASS_COLOURS = {"n01_red": (200, 40, 40), "n02_green": (40, 190, 60), "n03_blue": (40, 60, 210)}


def write_image_folder(root, train_per_class=12, val_per_class=5, size=40, seed=0, classes=CLASS_COLOURS):
    return data.write_striped_folder(root, classes, train_per_class, val_per_class, size, seed=seed)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A small ImageNet-layout folder: 3 classes, 12 train and 5 val images each (15 val: odd on purpose)."""
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine OpenMP spinning made model tests ~15x slower;
    for modules that a previous test may have left with more threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_flags(output_dir, *extra):
    """The smallest sensible run: mnasnet0_5 at 48 px (a 2x2 final feature map), CPU, no workers.

    BatchNorm momentum 0.3, so that a few dozen steps move the running statistics that validation uses.
    """
    return ["-a", "mnasnet0_5", "--device", "cpu", "-j", "0", "--train-crop-size", "48", "--val-resize-size", "52",
            "--val-crop-size", "48", "-b", "8", "--lr", "0.01", "--wd", "1e-5", "--bn-momentum", "0.3",
            "--min-crop-scale", "0.5", "--print-freq", "2",
            "--fps-warmup-steps", "1", "--output-dir", str(output_dir), *extra]


def pytest_configure(config):
    # pipeline.py silences this for runs; pytest resets warning filters per test.
    config.addinivalue_line("filterwarnings",
                            "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
