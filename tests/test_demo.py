"""training/demo.py: the digits demo folder and the defaults a bare `python main.py` takes."""
import os

import numpy as np
import pytest
from PIL import Image

import main
from helpers import write_image_folder
from training import data, demo
from training.utils import UserError


def test_prepare_demo_folder_is_complete_and_idempotent(tmp_path):
    from sklearn.datasets import load_digits

    root = tmp_path / "cache" / "digits"
    assert demo.prepare_demo_folder(root) == str(root)
    per_class = np.bincount(load_digits().target)
    expected_val = [round(n * demo.DEMO_VAL_FRACTION) for n in per_class]
    counts = {}
    for split in ("train", "val"):
        assert sorted(os.listdir(root / split)) == [str(d) for d in range(10)]
        counts[split] = [len(os.listdir(root / split / str(d))) for d in range(10)]
    assert counts["val"] == expected_val
    assert [t + v for t, v in zip(counts["train"], counts["val"])] == list(per_class)
    with Image.open(next((root / "val" / "3").iterdir())) as image:
        assert image.mode == "RGB" and image.size == (demo.DEMO_IMAGE_SIZE, demo.DEMO_IMAGE_SIZE)
    assert os.listdir(root.parent) == ["digits"]

    files = sorted(str(p) for p in root.rglob("*"))
    mtimes = [os.stat(p).st_mtime_ns for p in files]
    assert demo.prepare_demo_folder(str(root)) == str(root)
    assert sorted(str(p) for p in root.rglob("*")) == files
    assert [os.stat(p).st_mtime_ns for p in files] == mtimes

    train_set, val_set = data.image_folders(root, None, None)
    assert train_set.classes == [str(d) for d in range(10)] and len(val_set) == sum(expected_val)


def test_prepare_demo_folder_distrusts_a_half_written_folder(tmp_path):
    root = tmp_path / "digits"
    write_image_folder(root, train_per_class=1, val_per_class=0)
    with pytest.raises(UserError, match=str(root)):
        demo.prepare_demo_folder(root)


def test_demo_defaults_apply_only_without_data():
    demo_args = main.parse_args([])
    assert all(getattr(demo_args, key) == value for key, value in demo.DEMO_DEFAULTS.items())
    explicit = main.parse_args(["--epochs", "2", "-a", "mnasnet1_3"])
    assert (explicit.epochs, explicit.arch, explicit.lr) == (2, "mnasnet1_3", demo.DEMO_DEFAULTS["lr"])
    for argv in (["/data/imagenet"], ["--dummy"]):
        args = main.parse_args(argv)
        assert (args.arch, args.epochs, args.lr, args.train_crop_size) == ("mnasnet1_0", 90, 0.1, 224)
