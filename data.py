"""Data sets, transforms and loaders: ImageNet folders, synthetic data and the digits demo set."""

import math
import os
import shutil
import tempfile

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Short-run settings main.py applies when no DATA folder is given (keys are argparse dests).
# Measured: mnasnet0_5 reaches about 95% val Acc@1 on the digits demo in about 2 minutes on 2 CPU cores.
DEMO_DEFAULTS = {
    "arch": "mnasnet0_5",
    "epochs": 15,
    "batch_size": 64,
    "lr": 0.2,
    "warmup": 1,
    "label_smoothing": 0.1,
    "train_crop_size": 64,
    "val_resize_size": 64,
    "val_crop_size": 64,
    "workers": 1,
    "print_freq": 10,
}
# Digits fill the whole 32x32 image, so tiny ImageNet-style crops (8% of the area) hide the digit.
DEMO_CROP_SCALE = (0.35, 1.0)

DEMO_IMAGE_SIZE = 32
DEMO_VAL_FRACTION = 0.2
DEMO_SPLIT_SEED = 0
_DEMO_MARKER = "COMPLETE"


def _to_rgb(img):
    return img if img.mode == "RGB" else img.convert("RGB")


def train_transform(crop_size, scale=(0.08, 1.0)):
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.RandomResizedCrop(crop_size, scale=scale),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def val_transform(resize_size, crop_size):
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize(resize_size),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class _ClassFolder(datasets.ImageFolder):
    """ImageFolder whose class list is given, so val/ shares train/'s label indices."""

    def __init__(self, root, classes, transform, loader=default_loader):
        self._given_classes = list(classes)
        # allow_empty: val/ may hold only some of train/'s classes; an empty set is checked by the caller.
        super().__init__(root, transform=transform, loader=loader, allow_empty=True)

    def find_classes(self, directory):
        return self._given_classes, {name: i for i, name in enumerate(self._given_classes)}


def _class_dirs(folder):
    # Hidden folders (.ipynb_checkpoints, .git ...) are tool debris, not classes.
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _split_folder(data_dir, split):
    folder = os.path.join(data_dir, split)
    if not os.path.isdir(folder):
        raise UserError(f"data folder {data_dir} has no {split}/ subfolder ({folder} is missing or not a "
                        f"folder); expected {split}/<class>/<image> inside it")
    classes = _class_dirs(folder)
    if not classes:
        raise UserError(f"{folder} has no class subfolders; expected {folder}/<class>/<image>")
    return folder, classes


def image_folders(data_dir, train_tf, val_tf, loaders=(default_loader, default_loader)):
    """(train_set, val_set) from DATA/train/<class>/* and DATA/val/<class>/*, labelled by train/'s classes.

    ``loaders``: what reads a file for the train and val transforms (PIL images by default)."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        what = "is not a folder" if os.path.exists(data_dir) else "does not exist"
        raise UserError(f"data folder {data_dir} {what}")
    train_dir, classes = _split_folder(data_dir, "train")
    val_dir, val_classes = _split_folder(data_dir, "val")
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"{val_dir} has {len(unknown)} class folder(s) that {train_dir} lacks: {shown}")
    sets = []
    for folder, tf, loader in ((train_dir, train_tf, loaders[0]), (val_dir, val_tf, loaders[1])):
        ds = _ClassFolder(folder, classes, tf, loader)
        if not ds.samples:
            raise UserError(f"no images found in the class folders of {folder} "
                            f"(looked for {', '.join(IMG_EXTENSIONS)})")
        sets.append(ds)
    return tuple(sets)


class SyntheticImages(Dataset):
    """Fixed random images and labels (the same for a given seed and index), for --dummy runs."""

    def __init__(self, length, num_classes, crop_size, seed=0):
        self.length = length
        self.num_classes = num_classes
        self.crop_size = crop_size
        self.seed = seed
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed + index)
        image = torch.randn(3, self.crop_size, self.crop_size, generator=g)
        label = int(torch.randint(self.num_classes, (), generator=g))
        return image, label


def _demo_complete(root):
    return os.path.isfile(os.path.join(root, _DEMO_MARKER))


def _write_demo(dest):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the demo data set needs scikit-learn: pip install scikit-learn") from None
    import numpy as np
    from PIL import Image

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


class EvalShardSampler(Sampler):
    """Indices rank, rank+R, rank+2R, ...: every index on exactly one rank, no padding, no drops."""

    def __init__(self, dataset, num_replicas, rank):
        self.total = dataset if isinstance(dataset, int) else len(dataset)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self):
        return iter(range(self.rank, self.total, self.num_replicas))

    def __len__(self):
        return max(0, math.ceil((self.total - self.rank) / self.num_replicas))


def build_loader(dataset, batch_size, workers, sampler=None, shuffle=False, drop_last=False,
                 pin_memory=False, seed=None, collate_fn=None):
    # With a seeded generator the shuffle order is reproducible, and so are the worker seeds: the
    # DataLoader derives each worker's torch/random/numpy seeds from a base seed drawn from it.
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        generator=generator,
        collate_fn=collate_fn,
    )
