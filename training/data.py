"""Data sets and loaders: ImageNet folders, their layout checks and their listing (once per job, cached),
synthetic data, samplers, and loaders that skip or replace unreadable images (the transforms are in
transforms.py, the demo set in demo.py)."""
import collections.abc
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import weakref
import zipfile

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, has_file_allowed_extension

from training.utils import STOP_SIGNALS, UserError

# What PIL and torchvision.io raise on a truncated, empty or foreign file (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError)


SKIPPED_LABEL = -1


class UnreadableImage(Exception):
    """A file that no decoder could read; the decoder's error is the ``__cause__``."""


@contextlib.contextmanager
def decoding(source):
    """Marks the code that reads and decodes ``source``: a decoder's error there is an UnreadableImage. Only
    there: the same exception types raised by a transform's own code are bugs, and stay tracebacks."""
    try:
        yield
    except DECODE_ERRORS as exc:
        raise UnreadableImage(f"cannot decode {source}") from exc


def _split_item(item):
    """A data set index: an int, or (epoch, index) from TrainSampler."""
    return item if isinstance(item, tuple) else (0, item)


def sample_seed(seed, epoch, index):
    """The augmentation seed of one sample in one epoch: a function of the data alone, not of which worker
    loads it or how many workers there are, so an interrupted and resumed run draws the same crops."""
    return ((seed * 4099 + epoch) * 2 ** 32 + index) % 2 ** 63


class PackedSamples(collections.abc.Sequence):
    """ImageFolder's (path, class index) list, held in three numpy arrays instead of millions of Python objects.

    Reading a Python object writes its reference count, so each forked loader worker reading a plain list copies
    the pages it touches: over an ImageNet epoch, most of the list, once per worker (measured with 1.28M samples:
    134 MiB private memory per worker; 9 MiB packed). Arrays are read without writes: the workers share the main
    process's copy.
    """

    def __init__(self, samples):
        encoded = [os.fsencode(path) for path, _ in samples]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(path) for path in encoded], out=self._offsets[1:])
        self._paths = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.targets = np.array([target for _, target in samples], dtype=np.int64)

    @classmethod
    def from_arrays(cls, offsets, paths, targets):
        """The samples whose i-th path is ``paths[offsets[i]:offsets[i + 1]]`` (encoded bytes), labelled
        ``targets[i]``."""
        packed = cls.__new__(cls)
        packed._offsets, packed._paths, packed.targets = offsets, paths, targets
        return packed

    def arrays(self):
        """{"offsets", "paths", "targets"}: what from_arrays takes."""
        return {"offsets": self._offsets, "paths": self._paths, "targets": self.targets}

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # negative indices, and IndexError past the end
        path = self._paths[self._offsets[index]:self._offsets[index + 1]].tobytes()
        return os.fsdecode(path), int(self.targets[index])


class _ClassFolder(datasets.ImageFolder):
    """ImageFolder whose class list is given, so val/ shares train/'s label indices, and which survives
    unreadable files.

    A file that cannot be decoded is flagged in shared memory, where the main process (CheckedLoader) finds it
    whichever worker read it. In training it is replaced by the next readable image; in validation
    (``replace_unreadable=False``) it comes back as a blank image labelled SKIPPED_LABEL, and is not scored.
    With ``seed`` set, each sample's augmentation is seeded by (seed, epoch, index).
    """

    def __init__(self, root, classes, samples, transform, loader=default_loader, replace_unreadable=True,
                 seed=None):
        # VisionDataset's set-up alone: DatasetFolder's would list the folder again, into Python tuples. The
        # samples (list_images') are the ones it would list.
        datasets.VisionDataset.__init__(self, root, transform=transform)
        self.loader, self.extensions = loader, IMG_EXTENSIONS
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = self.imgs = samples
        self.targets = samples.targets
        self.replace_unreadable = replace_unreadable
        self.seed = seed
        self.unreadable = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        self.skip_events = torch.zeros(1, dtype=torch.int64).share_memory_()

    def read_error(self, index):
        """Why sample ``index`` cannot be read, or None."""
        try:
            self._read(self.samples[index][0], 0, index)
        except UnreadableImage as exc:
            cause = exc.__cause__
            if isinstance(cause, UnidentifiedImageError):
                return "not an image format PIL can identify (an empty file, or another kind of file)"
            return str(cause) or type(cause).__name__
        return None

    def _read(self, path, epoch, index):
        """The transformed sample of one file. The fast pipelines decode inside the transform and mark it
        (``decoding``); the standard one decodes in the loader."""
        with decoding(path):
            image = self.loader(path)
        return self._transform(image, epoch, index)

    def __getitem__(self, item):
        epoch, index = _split_item(item)
        unscored = False
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            path, target = self.samples[candidate]
            try:
                sample = self._read(path, epoch, index)
            except UnreadableImage:
                self.unreadable[candidate] = True
                self.skip_events += 1
                # Validation: the next readable image keeps the batch's shape and type, but is not scored.
                unscored = unscored or not self.replace_unreadable
                continue
            return sample, SKIPPED_LABEL if unscored else target
        raise UserError(f"no image in {self.root} can be read")

    def _transform(self, image, epoch, index):
        if self.transform is None:
            return image
        if self.seed is None:
            return self.transform(image)
        # A private RNG stream: the main process's (dropout) stream stays the same with -j 0 as with workers.
        # The CPU generator alone (the transforms draw from it): torch.manual_seed would seed every device too.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image)


def list_images(folder, classes):
    """The images of ``folder``'s class folders, labelled by their index in ``classes``: the files, order and
    labels of torchvision's ImageFolder (make_dataset: classes by sorted name, each class folder walked in sorted
    order following links, file names sorted, the IMG_EXTENSIONS filter; a class without a folder has no images).
    Packed class by class, so that only one class's paths at a time exist as Python objects: a whole list of
    ImageNet's 1.28M (path, index) tuples beside the arrays would raise the peak memory by about 540 MiB, against
    116 MiB (docs/usage.md)."""
    index = {name: i for i, name in enumerate(classes)}
    paths = bytearray()
    lengths, targets = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for name in sorted(classes):
        class_dir = os.path.join(folder, name)
        if not os.path.isdir(class_dir):
            continue
        encoded = [os.fsencode(path) for root, _, files in sorted(os.walk(class_dir, followlinks=True))
                   for path in (os.path.join(root, file) for file in sorted(files))
                   if has_file_allowed_extension(path, IMG_EXTENSIONS)]
        paths += b"".join(encoded)
        lengths.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
        targets.append(np.full(len(encoded), index[name], dtype=np.int64))
    lengths = np.concatenate(lengths)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return PackedSamples.from_arrays(offsets, np.frombuffer(paths, dtype=np.uint8), np.concatenate(targets))


class FileLists:
    """list_images for a job: once per job, and once per state of the data set across runs.

    Rank 0 lists (or reads a valid cache) and writes the list to a cache file in ``cache_dir`` (the output
    folder); the other ranks wait for it at a barrier and read it, so that a job lists each folder once rather
    than once per rank, and all ranks train on one list. A cache serves while the folder (as given, and where it
    resolves to), the class list and the modification times of the folder and its class folders are unchanged: a
    file added, removed or renamed in a class folder changes that folder's time (a change inside a folder nested
    in a class folder does not: delete the cache file then). A cache that cannot be read is listed again; one that
    cannot be written is said, and ranks that find no cache list the folder themselves."""

    def __init__(self, cache_dir, runtime, log):
        self.cache_dir, self.runtime, self.log = cache_dir, runtime, log

    def __call__(self, folder, classes):
        start = time.perf_counter()
        key = _listing_key(folder, classes)
        path = os.path.join(self.cache_dir, f"file-list-{os.path.basename(folder)}-"
                            f"{hashlib.sha256(os.fsencode(os.path.realpath(folder))).hexdigest()[:12]}.npz")
        samples = self._read(path, key, len(classes)) if self.runtime.is_main else None
        listed = self.runtime.is_main and samples is None
        if listed:
            samples = list_images(folder, classes)
            self._write(path, key, samples, folder)
        self.runtime.barrier()  # the other ranks read what rank 0 wrote
        if samples is None:
            samples = self._read(path, key, len(classes))
        if samples is None:  # rank 0 could not write it, or wrote it where this node cannot read it
            samples, listed = list_images(folder, classes), True
        how = "listed" if listed else f"read from the listing cache {path}"
        self.log.info(f"=> {folder}: {len(samples)} images {how} in {time.perf_counter() - start:.2f} s")
        return samples

    def _read(self, path, key, num_classes):
        """The cached samples when the cache at ``path`` is whole and its key is ``key``, else None."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                if stored["key"].item() != key:
                    return None  # another state of the folder, or another folder or class list
                samples = PackedSamples.from_arrays(stored["offsets"], stored["paths"], stored["targets"])
            _check_packed(samples, num_classes)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            self.log.warning(f"=> ignored the listing cache {path}, which cannot be read ({type(exc).__name__}: "
                             f"{exc}); listing again")
            return None
        return samples

    def _write(self, path, key, samples, folder):
        """Write the cache whole or not at all: to a temporary file renamed over ``path``."""
        tmp_path = path + ".tmp"
        try:
            with open(tmp_path, "wb") as handle:
                np.savez(handle, key=np.array(key), **samples.arrays())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_path, path)
        except OSError as exc:
            self.log.warning(f"=> could not write the listing cache {path} ({exc}); the next run lists {folder} "
                             "again")
            with contextlib.suppress(OSError):
                os.remove(tmp_path)


def _listing_key(folder, classes):
    """What a listing of ``folder`` depends on, as a string: see FileLists."""
    times = []
    for path in [folder, *(os.path.join(folder, name) for name in sorted(classes))]:
        try:
            times.append(os.stat(path).st_mtime_ns)
        except FileNotFoundError:
            times.append(None)
    return json.dumps({"folder": folder, "resolved": os.path.realpath(folder), "classes": list(classes),
                       "mtimes_ns": times})


def _check_packed(samples, num_classes):
    """A ValueError unless the arrays are a consistent sample list with labels below ``num_classes``."""
    offsets, paths, targets = samples.arrays().values()
    if not (offsets.ndim == paths.ndim == targets.ndim == 1 and len(offsets) == len(targets) + 1
            and offsets[0] == 0 and offsets[-1] == len(paths) and (np.diff(offsets) >= 0).all()
            and (len(targets) == 0 or 0 <= targets.min() <= targets.max() < num_classes)):
        raise ValueError("its arrays do not form a list of samples")


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


def _check_no_empty_class(ds, folder, class_dirs):
    counts = np.bincount(ds.targets, minlength=len(ds.classes))
    empty = [name for name in class_dirs if counts[ds.class_to_idx[name]] == 0]
    if empty:
        shown = ", ".join(os.path.join(folder, name) for name in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise UserError(f"{len(empty)} class folder(s) hold no images (looked for {', '.join(IMG_EXTENSIONS)}): "
                        f"{shown}")


def _check_known_classes(val_dir, val_classes, classes, source):
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"{val_dir} has {len(unknown)} class folder(s) that {source} lacks: {shown}")


def check_layout(data_dir, need_train=True):
    """The folder-level checks of a data set (no file is listed, so it is quick on ImageNet's 1.28M images):
    ((train/, its classes), (val/, its classes)), or a UserError naming what is wrong. Without ``need_train``
    (evaluation) a missing train/ is no error: the first item is then None."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        what = "is not a folder" if os.path.exists(data_dir) else "does not exist"
        raise UserError(f"data folder {data_dir} {what}")
    train = None
    if need_train or os.path.exists(os.path.join(data_dir, "train")):
        train = _split_folder(data_dir, "train")
    val_dir, val_classes = _split_folder(data_dir, "val")
    if train is not None:
        _check_known_classes(val_dir, val_classes, train[1], train[0])
    return train, (val_dir, val_classes)


def _image_folder(folder, classes, class_dirs, transform, loader, is_train, seed, file_lists):
    ds = _ClassFolder(folder, classes, file_lists(folder, classes), transform, loader, replace_unreadable=is_train,
                      seed=seed if is_train else None)
    if not len(ds.samples):
        raise UserError(f"no images found in the class folders of {folder} (looked for {', '.join(IMG_EXTENSIONS)})")
    _check_no_empty_class(ds, folder, class_dirs)
    return ds


def image_folders(data_dir, train_tf, val_tf, seed=None, loaders=(default_loader, default_loader),
                  file_lists=list_images):
    """(train_set, val_set) from DATA/train/<class>/* and DATA/val/<class>/*, labelled by train/'s classes.

    ``seed``: seed the training augmentation per (seed, epoch, sample), see _ClassFolder.
    ``loaders``: what reads a file for the train and val transforms (PIL images by default).
    ``file_lists``: what lists a split's images (list_images, or a run's FileLists)."""
    (train_dir, classes), (val_dir, val_classes) = check_layout(data_dir)
    return (_image_folder(train_dir, classes, classes, train_tf, loaders[0], True, seed, file_lists),
            _image_folder(val_dir, classes, val_classes, val_tf, loaders[1], False, None, file_lists))


def val_image_folder(data_dir, val_tf, classes=None, loader=default_loader, file_lists=list_images):
    """The val/ set alone, for evaluation: labelled by ``classes`` (the evaluated checkpoint's) when given, else
    by train/'s class folders, the order training used. ``file_lists`` as for image_folders."""
    train, (val_dir, val_classes) = check_layout(data_dir, need_train=False)
    if classes is not None:
        _check_known_classes(val_dir, val_classes, classes, "the checkpoint's class list")
    elif train is not None:
        classes = train[1]
    else:
        raise UserError(f"{os.fspath(data_dir)} has no train/ to take the class order from, and the checkpoint "
                        "does not record its classes (main.py's checkpoints do): add train/ with one folder per "
                        "class")
    return _image_folder(val_dir, list(classes), val_classes, val_tf, loader, False, None, file_lists)


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

    def __getitem__(self, item):
        _, index = _split_item(item)
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed + index)
        image = torch.randn(3, self.crop_size, self.crop_size, generator=g)
        label = int(torch.randint(self.num_classes, (), generator=g))
        return image, label


class EvalShardSampler(Sampler):
    """Indices rank, rank+R, rank+2R, ...: every index on exactly one rank, no padding, no drops."""

    def __init__(self, dataset, num_replicas, rank):
        self.total = len(dataset)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self):
        return iter(range(self.rank, self.total, self.num_replicas))

    def __len__(self):
        return max(0, math.ceil((self.total - self.rank) / self.num_replicas))


class TrainSampler(Sampler):
    """DistributedSampler's order, a function of (seed, epoch) on one process as on many, yielding
    (epoch, index) so the data set can seed each sample's augmentation, and able to start mid-epoch
    (``set_epoch(epoch, start)`` skips the first ``start`` samples of this rank's share)."""

    def __init__(self, dataset, num_replicas, rank, seed):
        self.order = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.order.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __iter__(self):
        return ((self.epoch, index) for index in itertools.islice(self.order, self.start, None))

    def __len__(self):
        return max(0, len(self.order) - self.start)


# Every CheckedLoader of this process, so that close_loaders() can end their workers on any way out of a run.
_LOADERS = weakref.WeakSet()


class CheckedLoader:
    """A DataLoader whose data set's unreadable files are reported from the main process: each path is logged
    once (or, with ``strict``, is an error), and ``skipped`` counts the files skipped in the latest pass."""

    def __init__(self, loader, strict, log):
        self.loader = loader
        self.dataset = loader.dataset
        self.strict = strict
        self.log = log
        self.skipped = 0
        self._events = 0
        self._reported = set()
        self._batches = None
        _LOADERS.add(self)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.skipped = 0
        checked = hasattr(self.dataset, "unreadable")
        if checked:
            self.dataset.unreadable.zero_()
        self._batches = iter(self.loader)
        for batch in self._batches:
            if checked:
                self._check()
            yield batch
        if checked:
            self._check()

    def close(self):
        """End the loader's worker processes now.

        Needed where an exception leaves the run: its traceback keeps the iterator alive, so the workers (which
        ignore stop signals) would still be running when multiprocessing's exit handler joins them, forever.
        """
        batches, self._batches = self._batches, None
        if getattr(self.loader, "_iterator", None) is batches:
            self.loader._iterator = None  # a persistent pool: the next pass must not reuse the closed one
        if hasattr(batches, "_shutdown_workers"):
            batches._shutdown_workers()  # asks each worker to finish, and waits a few seconds for it
            for worker in getattr(batches, "_workers", ()):
                if worker.is_alive():
                    worker.kill()  # stuck in a transform: SIGTERM, which they ignore, would not end it

    def _check(self):
        events = int(self.dataset.skip_events)
        if events == self._events:
            return
        self._events = events
        bad = self.dataset.unreadable.nonzero().flatten().tolist()
        self.skipped = len(bad)
        for index in bad:
            path = self.dataset.samples[index][0]
            if path in self._reported:
                continue
            self._reported.add(path)
            reason = self.dataset.read_error(index)
            if self.strict:
                raise UserError(f"cannot read image {path}: {reason} (--strict-data)")
            self.log.warning(f"=> skipped unreadable image {path}: {reason}")


def close_loaders():
    """End the worker processes of every CheckedLoader of this process (see CheckedLoader.close)."""
    for loader in list(_LOADERS):
        loader.close()


def _ignore_stop_signals(worker_id):
    # Ctrl-C reaches the whole process group, and a scheduler's SIGTERM often does: the main process saves and
    # stops, then shuts its workers down; a worker killed first would turn that into a crash.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def worker_start_context():
    """How loader workers start: forked on Linux, whatever the process's default start method (spawn in the ranks
    of --multiprocessing-distributed, forkserver from Python 3.14 on), else the platform's default (None).

    A forked worker shares the process's imported modules and its packed file list (PackedSamples) page by page;
    a spawned one imports torch again and unpickles its own copy of the list (measured at ImageNet's 1.28M files
    in docs/speed.md). Forking a process that has set up CUDA, an NPU or a process group is safe here because the
    workers touch no device: every pipeline's worker code (data.py's _ClassFolder and SyntheticImages, the
    transforms, pipeline.bytes_loader) makes CPU tensors, and everything on a device (pinning, copies, the gpu
    pipeline's decode: prefetch.py) runs in the main process. A worker that called CUDA would fail at once
    ("Cannot re-initialize CUDA in forked subprocess"). torchrun and srun ranks, whose
    default start method is fork, have always forked their workers this way."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return None


def build_loader(dataset, batch_size, workers, sampler=None, drop_last=False, pin_memory=False, seed=None,
                 collate_fn=None, persistent=True):
    """A DataLoader; with ``persistent`` its workers live from the first pass to the end of the run (training's
    every epoch), otherwise they end with each pass (validation: not alive beside training's all run long). The
    workers start as worker_start_context says."""
    # The order is the sampler's; with a seeded generator the worker seeds are reproducible too: the DataLoader
    # derives each worker's torch/random/numpy seeds from a base seed drawn from it.
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=persistent and workers > 0,
        generator=generator,
        worker_init_fn=_ignore_stop_signals,
        collate_fn=collate_fn,
        multiprocessing_context=worker_start_context() if workers > 0 else None,
    )
