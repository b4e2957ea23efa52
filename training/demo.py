"""The demo data set (scikit-learn's digits as an ImageNet-layout folder) with the settings main.py uses when no
DATA folder is given, and the striped synthetic folders the tests and tools/device_check.py train on."""
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from training import checkpoint
from training.utils import UserError

# Short-run settings main.py applies when no DATA folder is given (keys are argparse dests).
# The README gives what main.py --seed 0 reaches with them, and in how long.
DEMO_DEFAULTS = {
    "arch": "mnasnet0_5",
    "epochs": 15,
    "batch_size": 64,
    # From scratch on 1.4k images, 0.05 and above diverge in the first epochs.
    "lr": 0.03,
    "warmup": 1,
    "nesterov": True,
    "weight_decay": 1e-5,
    "label_smoothing": 0.1,
    # The digits are 32 px; 48 px crops give the net a 2x2 final feature map.
    "train_crop_size": 48,
    # Digits fill the whole image, so ImageNet's 8%-area crops would often cut the digit away.
    "min_crop_scale": 0.35,
    "val_resize_size": 48,
    "val_crop_size": 48,
    "workers": 1,
    "print_freq": 10,
}


DEMO_IMAGE_SIZE = 32


DEMO_VAL_FRACTION = 0.2


DEMO_SPLIT_SEED = 0


_DEMO_MARKER = "COMPLETE"


def _demo_complete(root):
    return os.path.isfile(os.path.join(root, _DEMO_MARKER))


def _write_demo(dest):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the demo data set needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    rng = np.random.RandomState(DEMO_SPLIT_SEED)
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        order = rng.permutation(len(indices))
        n_val = round(len(indices) * DEMO_VAL_FRACTION)
        for rank, pos in enumerate(order):
            split = "val" if rank < n_val else "train"
            folder = os.path.join(dest, split, str(label))
            os.makedirs(folder, exist_ok=True)
            index = int(indices[pos])
            # Pixel values are 0..16 ink intensities.
            pixels = np.round(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize((DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE),
                                                               Image.BILINEAR)
            image.convert("RGB").save(os.path.join(folder, f"{index:04d}.png"))
    with open(os.path.join(dest, _DEMO_MARKER), "w") as f:
        f.write(f"scikit-learn digits, {len(digits.target)} images, {DEMO_IMAGE_SIZE}px\n")


def write_striped_folder(root, class_colours, train_per_class, val_per_class, size, seed=0, quality=75):
    """An ImageNet-layout folder of synthetic JPEGs, ``<root>/{train,val}/<class>/<class>_<i>.JPEG``: each class a
    noisy colour with stripes of its own orientation, learnable in a few steps and not by chance (the tests' and
    tools/device_check.py's data). ``class_colours``: {class folder name: (r, g, b)}. Returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for index, (name, colour) in enumerate(class_colours.items()):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = np.array(colour, dtype=np.float32) + rng.normal(0, 25, (size, size, 3))
                if index % 2:
                    pixels[::4] *= 0.4
                else:
                    pixels[:, ::4] *= 0.4
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(os.path.join(folder, f"{name}_{i}.JPEG"), format="JPEG", quality=quality)
    return str(root)


def prepare_demo_folder(root):
    """Write scikit-learn's digits as ROOT/{train,val}/<digit>/*.png once; return ROOT."""
    root = os.path.abspath(os.fspath(root))
    if _demo_complete(root):
        return root
    if os.path.exists(root) and not (os.path.isdir(root) and not os.listdir(root)):
        raise UserError(f"{root} exists but is not a complete demo data set; remove it or pass a DATA folder")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    # Built beside ROOT and renamed in one step, so an interrupted run never leaves a half folder at ROOT.
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
    try:
        _write_demo(tmp)
        if os.path.isdir(root):
            os.rmdir(root)
        os.rename(tmp, root)
    except OSError:
        # Another process (e.g. a second rank) may have finished first; its copy is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not _demo_complete(root):
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def output_dir(base):
    """Where a demo run writes: ``base``, or when it holds an earlier run's checkpoint, the first of ``base``/run-2,
    run-3 ... that holds none (said on the console). The demo's images stay in ``base``."""
    folder, number = base, 1
    while checkpoint.output_checkpoint(folder) is not None:
        number += 1
        folder = os.path.join(base, f"run-{number}")
    if folder != base:
        print(f"=> {base} holds an earlier run's checkpoint: this demo run writes to {folder}")
    return folder
