"""training/data.py: the image folders and their checks, image formats, samplers, loaders and their workers."""
import logging
import multiprocessing
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main
from helpers import run_main_in_process, tiny_flags, write_image_folder
from training import data, distributed, pipeline, transforms
from training.utils import UserError


def _save(path, mode, size=(20, 24), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    colour = {"RGB": (200, 30, 30), "L": 128, "CMYK": (0, 200, 200, 20), "P": 3}[mode]
    Image.new(mode, size, colour).save(path, format=fmt)


def _folder(root, layout):
    """layout: {split: {class: number of RGB PNGs}}."""
    for split, classes in layout.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for name, count in classes.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                _save(os.path.join(root, split, name, f"{i}.png"), "RGB")
    return str(root)


@pytest.fixture
def folder(tmp_path):
    """cat/dog/fish in train; val lacks dog. Mixed modes and formats, plus files that are not images."""
    root = _folder(tmp_path / "imagenet", {"train": {"cat": 2, "dog": 2, "fish": 2}, "val": {"cat": 1, "fish": 1}})
    _save(os.path.join(root, "train", "cat", "grey.jpg"), "L", fmt="JPEG")
    _save(os.path.join(root, "train", "dog", "cmyk.JPEG"), "CMYK", fmt="JPEG")
    _save(os.path.join(root, "train", "fish", "palette.png"), "P")
    _save(os.path.join(root, "val", "fish", "cmyk.jpeg"), "CMYK", fmt="JPEG")
    for split in ("train", "val"):
        with open(os.path.join(root, split, "cat", "notes.txt"), "w") as f:
            f.write("not an image\n")
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
    return root


def test_image_folders_load_rgb_and_share_train_labels(folder):
    train_set, val_set = data.image_folders(folder, transforms.train_transform(64), transforms.val_transform(72, 64))
    assert train_set.classes == val_set.classes == ["cat", "dog", "fish"]
    assert len(train_set) == 9 and len(val_set) == 3
    assert sorted(label for _, label in val_set.samples) == [0, 2, 2]
    for ds in (train_set, val_set):
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.shape == (3, 64, 64) and image.dtype == torch.float32
            assert label == ds.samples[i][1]


def test_val_labels_follow_train_class_names(tmp_path):
    # Sorted on its own, val/ would call "b" class 0; it must get train/'s index 1.
    root = _folder(tmp_path, {"train": {"a": 1, "b": 1, "c": 1}, "val": {"c": 1, "b": 2}})
    _, val_set = data.image_folders(root, None, None)
    assert sorted((os.path.basename(os.path.dirname(p)), label) for p, label in val_set.samples) == [
        ("b", 1), ("b", 1), ("c", 2)]


@pytest.mark.parametrize("layout, named", [
    (None, ""),
    ({"val": {"a": 1}}, "train"),
    ({"train": {"a": 1}}, "val"),
    ({"train": {}, "val": {"a": 1}}, "train"),
    ({"train": {"a": 1}, "val": {}}, "val"),
    ({"train": {"a": 0, "b": 0}, "val": {"a": 1}}, "train"),
    ({"train": {"a": 1}, "val": {"a": 0}}, "val"),
    ({"train": {"a": 1}, "val": {"a": 1, "zebra": 1}}, "val"),
])
def test_bad_layouts_name_the_folder(tmp_path, layout, named):
    root = tmp_path / "ds"
    if layout is not None:
        _folder(root, layout)
    with pytest.raises(UserError) as info:
        data.image_folders(root, None, None)
    assert str(root / named).rstrip("/") in str(info.value)
    if "zebra" in str(layout):
        assert "zebra" in str(info.value)


def test_data_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file.tar"
    path.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        data.image_folders(path, None, None)


def test_eval_shard_sampler_visits_every_index_once():
    for total in (0, 1, 2, 10, 11):
        seen = []
        for rank in range(3):
            sampler = data.EvalShardSampler(range(total), 3, rank)
            shard = list(sampler)
            assert len(sampler) == len(shard)
            seen += shard
        assert sorted(seen) == list(range(total))
    assert list(data.EvalShardSampler(range(10), 3, 1)) == [1, 4, 7]
    with pytest.raises(ValueError):
        data.EvalShardSampler(range(10), 3, 3)


def test_synthetic_images_are_deterministic():
    a, b = data.SyntheticImages(5, 10, 32, seed=3), data.SyntheticImages(5, 10, 32, seed=3)
    assert len(a) == 5 and a.classes == [str(i) for i in range(10)]
    for i in range(5):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert xa.shape == (3, 32, 32) and torch.equal(xa, xb) and ya == yb and 0 <= ya < 10
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], data.SyntheticImages(5, 10, 32, seed=4)[0][0])
    with pytest.raises(IndexError):
        a[5]


def test_build_loader_seeded_order_and_augmentation_repeat(folder):
    def order(seed, epoch=0):
        sampler = data.TrainSampler(range(40), 1, 0, seed)
        sampler.set_epoch(epoch)
        return [index for _, index in sampler]
    assert order(7) == order(7) != list(range(40)) and sorted(order(7)) == list(range(40))
    assert order(8) != order(7) and order(7, epoch=1) != order(7)

    train_set, _ = data.image_folders(folder, transforms.train_transform(64), None)
    runs = []
    for _ in range(2):
        loader = data.build_loader(train_set, 3, 1, sampler=data.TrainSampler(train_set, 1, 0, 5), drop_last=True,
                                   seed=5)
        assert loader.persistent_workers and len(loader) == 3
        runs.append([(x, y) for x, y in loader])
    for (xa, ya), (xb, yb) in zip(*runs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_build_loader_with_sampler(folder):
    _, val_set = data.image_folders(folder, None, transforms.val_transform(64, 64))
    loader = data.build_loader(val_set, 2, 0, sampler=data.EvalShardSampler(val_set, 2, 1))
    assert not loader.persistent_workers
    assert [y.tolist() for _, y in loader] == [[val_set.samples[1][1]]]


def test_augmentation_does_not_depend_on_workers(image_folder):
    train_set, _ = data.image_folders(image_folder, transforms.train_transform(32), None, seed=5)
    batches = []
    for workers in (0, 2):
        sampler = data.TrainSampler(train_set, 1, 0, seed=5)
        sampler.set_epoch(3, start=8)
        loader = data.build_loader(train_set, 4, workers, sampler=sampler)
        batches.append([images for images, _ in loader])
    assert len(batches[0]) == len(train_set) // 4 - 2
    assert all(torch.equal(a, b) for a, b in zip(*batches))


# --- image formats: what ImageFolder lists and Pillow reads is an image ---

# (file name, Pillow format): every extension ImageFolder lists, and a GIF under a listed name.
FORMATS = [("a.bmp", "BMP"), ("b.tif", "TIFF"), ("c.tiff", "TIFF"), ("d.ppm", "PPM"), ("e.pgm", "PPM"),
           ("f.png", "PNG"), ("g.webp", "WEBP"), ("h_gif_inside.jpg", "GIF"), ("i.jpeg", "JPEG")]


@pytest.fixture(scope="module")
def formats_folder(tmp_path_factory):
    """The tiny folder, plus one image in each format in every train/ and val/ class."""
    root = write_image_folder(tmp_path_factory.mktemp("formats"), train_per_class=3, val_per_class=1)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in os.listdir(os.path.join(root, split)):
            for name, fmt in FORMATS:
                pixels = rng.integers(0, 255, (44, 52, 3), dtype=np.uint8)
                image = Image.fromarray(pixels).convert("L" if name.endswith(".pgm") else "RGB")
                image.save(os.path.join(root, split, cls, name), format=fmt)
    return root


def _datasets(root, name, fast_val=True):
    args = main.parse_args(["x", "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32",
                            "--min-crop-scale", "0.5", "--pipeline", name])
    (train_tf, train_read), (val_tf, val_read) = pipeline.build(name, args, fast_val=fast_val)
    return data.image_folders(root, train_tf, val_tf, seed=0, loaders=(train_read, val_read))


@pytest.mark.parametrize("name", ["fast", "tensor", "standard"])
def test_every_image_format_imagefolder_lists_is_read_as_an_image(formats_folder, name):
    for ds in _datasets(formats_folder, name):
        for index, (path, label) in enumerate(ds.samples):
            image, target = ds[index]
            assert target == label and tuple(image.shape) == (3, 32, 32), path
        assert not ds.unreadable.any(), [ds.samples[i][0] for i in ds.unreadable.nonzero().flatten()]
        assert {os.path.splitext(p)[1] for p, _ in ds.samples} >= {".bmp", ".tif", ".ppm", ".pgm", ".webp"}


def test_other_formats_train_with_strict_data(formats_folder, tmp_path):
    summary = run_main_in_process(formats_folder, *tiny_flags(tmp_path, "--epochs", "1", "--strict-data", "--pipeline",
                                                              "tensor", "--fast-val"))
    assert summary["train_skipped_images"] == 0 and summary["val_skipped_images"] == 0
    assert summary["val_images"] == 3 * (1 + len(FORMATS))


@pytest.mark.parametrize("name", ["fast", "tensor", "standard"])
def test_a_corrupt_file_in_any_format_is_still_unreadable(tmp_path, name):
    root = write_image_folder(tmp_path, train_per_class=2, val_per_class=1)
    folder = os.path.join(root, "train", "n01_red")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(os.path.join(folder, "cut.bmp"))
    with open(os.path.join(folder, "cut.bmp"), "r+b") as handle:
        handle.truncate(200)
    with open(os.path.join(folder, "text.tif"), "w") as handle:
        handle.write("not a picture\n")
    train_set, _ = _datasets(root, name)
    bad = {i for i, (path, _) in enumerate(train_set.samples) if os.path.basename(path) in ("cut.bmp", "text.tif")}
    for index in range(len(train_set)):
        train_set[index]
    assert set(train_set.unreadable.nonzero().flatten().tolist()) == bad
    assert all(train_set.read_error(i) for i in bad)


@pytest.mark.parametrize("name", ["fast", "tensor", "standard"])
def test_an_error_in_a_transform_is_a_traceback_not_an_unreadable_image(image_folder, monkeypatch, name):
    def broken(*args, **kwargs):
        raise ValueError("a bug in a transform")
    # Every pipeline's training crop goes through one of these.
    monkeypatch.setattr(transforms.F, "resized_crop", broken)
    monkeypatch.setattr(transforms.Image.Image, "resize", broken)
    monkeypatch.setattr(transforms.T.RandomResizedCrop, "forward", broken)
    train_set, _ = _datasets(image_folder, name)
    with pytest.raises(ValueError, match="a bug in a transform"):
        train_set[0]
    assert not train_set.unreadable.any()


# --- loader workers and host memory ---

def _loaders(image_folder, tmp_path, *extra):
    args = main.parse_args([image_folder, *tiny_flags(tmp_path, "-j", "2", *extra)])
    main.prepare(args)
    runtime = distributed.Runtime(kind="cpu", device=torch.device("cpu"))
    train_set, val_set = main.build_datasets(args, resume_path="")
    return main.build_loaders(train_set, val_set, runtime, args, main.setup_logging(str(tmp_path), "t.log", 0))


def test_validation_workers_end_with_each_pass_training_workers_stay(image_folder, tmp_path):
    train_loader, val_loader, _ = _loaders(image_folder, tmp_path)
    try:
        for _ in train_loader:
            pass
        training_workers = set(multiprocessing.active_children())
        assert len(training_workers) == 2
        for _ in val_loader:
            pass
        # Validation's workers are gone; training's two wait for the next epoch.
        assert set(multiprocessing.active_children()) == training_workers
    finally:
        data.close_loaders()
    assert not multiprocessing.active_children()


def test_image_folder_samples_are_numpy_arrays_not_python_objects(image_folder):
    train_set, val_set = _datasets(image_folder, "fast")
    for ds in (train_set, val_set):
        assert not isinstance(ds.samples, list)
        assert all(isinstance(value, np.ndarray) for value in vars(ds.samples).values())
        listed = data.datasets.ImageFolder(ds.root, allow_empty=True).samples
        assert [(path, ds.classes[label]) for path, label in ds.samples] == [
            (path, os.path.basename(os.path.dirname(path))) for path, _ in listed]


def _private_mib():
    with open("/proc/self/smaps_rollup") as handle:
        fields = dict(line.split()[:2] for line in handle if line.split()[0].startswith("Private"))
    return sum(int(value) for value in fields.values()) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux /proc only")
def test_a_forked_worker_reading_every_sample_does_not_copy_the_list():
    plain = [(f"/data/imagenet/train/n{c:08d}/n{c:08d}_{i:06d}.JPEG", c) for i in range(300) for c in range(1000)]
    packed = data.PackedSamples(plain)
    assert packed[12345] == plain[12345] and packed[-1] == plain[-1] and len(packed) == len(plain)
    growth = {}
    for name, samples in (("list", plain), ("packed", packed)):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a loader worker: forked, reads each sample once
            before = _private_mib()
            for index in range(len(samples)):
                samples[index]
            os.write(write, str(_private_mib() - before).encode())
            os._exit(0)
        os.close(write)
        growth[name] = float(os.read(read, 100))
        os.waitpid(pid, 0)
    # The list's pages are copied into the worker (about 30 MiB here); the arrays' are not.
    assert growth["list"] > 10 and growth["packed"] < 3, growth


class FakeFileList(torch.utils.data.Dataset):
    """``count`` ImageNet-like paths packed as a folder's file list is; an item is the pid of the process
    that loads it."""

    def __init__(self, count):
        self.samples = data.PackedSamples([(f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG",
                                            i % 1000) for i in range(count)])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        self.samples[index]
        return os.getpid()


def private_mib(pid):
    """A process's private memory (the pages no other process shares), from /proc/PID/smaps_rollup."""
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        return sum(int(line.split()[1]) for line in handle if line.startswith("Private_")) / 1024


def worker_report(local_rank, result_path, count):
    """In a spawned rank, as distributed.launch starts them: the start method of build_loader's workers, and the
    private memory of one of its workers and of a spawned DataLoader worker, over the same file list."""
    import json
    import multiprocessing
    dataset = FakeFileList(count)
    report = {"default": multiprocessing.get_start_method()}
    for name, loader in (("build_loader", data.build_loader(dataset, 1, 1, persistent=False)),
                         ("spawned", torch.utils.data.DataLoader(dataset, num_workers=1,
                                                                 multiprocessing_context="spawn"))):
        context = loader.multiprocessing_context
        report[f"{name}_method"] = context.get_start_method() if context else report["default"]
        batches = iter(loader)
        report[f"{name}_mib"] = private_mib(int(next(batches)))
        del batches
    with open(result_path, "w") as handle:
        json.dump(report, handle)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux's /proc memory accounting")
def test_loader_workers_fork_in_a_spawned_rank(tmp_path):
    import json
    result = tmp_path / "report.json"
    torch.multiprocessing.start_processes(worker_report, args=(str(result), 200_000), nprocs=1, start_method="spawn")
    report = json.loads(result.read_text())
    assert report["default"] == "spawn"
    assert report["build_loader_method"] == "fork"
    # A forked worker shares the rank's torch and file list; a spawned one imports and unpickles its own.
    assert report["build_loader_mib"] < report["spawned_mib"] / 3


def _tricky_tree(root):
    """Class folders with nested folders whose names sort across each other, mixed-case and foreign extensions,
    and a class that val/ lacks."""
    files = ["train/b/1.JPEG", "train/b/0.png", "train/b/a-b/2.jpg", "train/b/a/3.jpeg", "train/b/a/x/4.PNG",
             "train/b/notes.txt", "train/a/10.webp", "train/a/9.bmp", "train/a.c/5.JPG", "train/c/6.png",
             "val/b/7.png", "val/a.c/8.png"]
    for name in files:
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        (root / name).write_bytes(b"")
    return root / "train"


@pytest.mark.parametrize("classes", [["a", "a.c", "b", "c"], ["c", "b", "a.c", "a"]])
def test_listing_has_torchvisions_files_order_and_labels(tmp_path, classes):
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    train = _tricky_tree(tmp_path)
    index = {name: i for i, name in enumerate(classes)}
    expected = make_dataset(str(train), index, IMG_EXTENSIONS, allow_empty=True)
    assert len(expected) == 9
    assert list(data.list_images(str(train), classes)) == expected
    assert list(data.list_images(str(tmp_path / "val"), classes)) == make_dataset(
        str(tmp_path / "val"), index, IMG_EXTENSIONS, allow_empty=True)


@pytest.fixture
def listing_log(caplog):
    log = logging.getLogger("test_file_lists")
    with caplog.at_level(logging.INFO, logger="test_file_lists"):
        yield log, caplog


def _listed(file_lists, folder, classes, caplog):
    caplog.clear()
    samples = file_lists(folder, classes)
    return list(samples), caplog.text


def test_file_list_cache_serves_the_next_run_until_the_folder_changes(tmp_path, listing_log):
    from helpers import cpu_runtime
    log, caplog = listing_log
    train, cache = str(_tricky_tree(tmp_path / "data")), tmp_path / "out"
    cache.mkdir()
    classes = ["a", "a.c", "b", "c"]
    first, said = _listed(data.FileLists(str(cache), cpu_runtime(), log), train, classes, caplog)
    assert first == list(data.list_images(train, classes)) and " listed in " in said
    assert len(list(cache.glob("file-list-train-*.npz"))) == 1
    # The next run (a new FileLists) reads the cache.
    again, said = _listed(data.FileLists(str(cache), cpu_runtime(), log), train, classes, caplog)
    assert again == first and "read from the listing cache" in said
    # Another class list labels otherwise: not served from this cache.
    _, said = _listed(data.FileLists(str(cache), cpu_runtime(), log), train, classes[::-1], caplog)
    assert " listed in " in said
    # A file added to a class folder: the next run lists again, and sees it.
    (tmp_path / "data" / "train" / "c" / "new.png").write_bytes(b"")
    changed, said = _listed(data.FileLists(str(cache), cpu_runtime(), log), train, classes, caplog)
    assert " listed in " in said and changed == list(data.list_images(train, classes)) and len(changed) == 10
    _, said = _listed(data.FileLists(str(cache), cpu_runtime(), log), train, classes, caplog)
    assert "read from the listing cache" in said


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_file_list_cache_is_listed_again(tmp_path, listing_log, damage):
    from helpers import cpu_runtime
    log, caplog = listing_log
    train, cache = str(_tricky_tree(tmp_path / "data")), tmp_path / "out"
    cache.mkdir()
    classes = ["a", "a.c", "b", "c"]
    expected, _ = _listed(data.FileLists(str(cache), cpu_runtime(), log), train, classes, caplog)
    (cached,) = cache.glob("file-list-train-*.npz")
    whole = cached.read_bytes()
    cached.write_bytes({"truncated": whole[:len(whole) // 2], "garbage": os.urandom(len(whole)), "empty": b""}[damage])
    listed, said = _listed(data.FileLists(str(cache), cpu_runtime(), log), train, classes, caplog)
    assert listed == expected and " listed in " in said and "ignored the listing cache" in said
    # Rewritten whole: the next run reads it.
    _, said = _listed(data.FileLists(str(cache), cpu_runtime(), log), train, classes, caplog)
    assert "read from the listing cache" in said


def test_an_unwritable_file_list_cache_is_no_error(tmp_path, listing_log):
    from helpers import cpu_runtime
    log, caplog = listing_log
    train = str(_tricky_tree(tmp_path / "data"))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    listed, said = _listed(data.FileLists(str(not_a_folder), cpu_runtime(), log), train, ["a", "b"], caplog)
    assert listed == list(data.list_images(train, ["a", "b"]))
    assert " listed in " in said and "could not write the listing cache" in said
