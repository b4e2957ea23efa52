"""training/pipeline.py: each input path (--pipeline) against the plain one (same crops and pixels within
resampling tolerance for the same random numbers, the same loss trajectory), and the gpu pipeline's file checks."""
import math
import os
import types

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

import mnasnet
from helpers import (cpu_runtime, run_main_in_process, tiny_flags, write_image_folder, write_jpeg,
                     write_jpeg_with_corrupt_scan, write_random_bytes, write_truncated_jpeg)
from training import data, pipeline, prefetch, transforms


def test_gpu_pipeline_workers_turn_away_truncated_and_foreign_files(tmp_path):
    good = pipeline.bytes_loader(write_jpeg(tmp_path / "good.JPEG"))
    assert good.path.endswith("good.JPEG") and good.data.dtype == torch.uint8
    png = tmp_path / "png.JPEG"
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    pipeline.bytes_loader(str(png))  # not a JPEG, still an image: decoded on the host later
    for bad in (write_truncated_jpeg(tmp_path / "truncated.JPEG"), write_random_bytes(tmp_path / "foreign.JPEG")):
        with pytest.raises(OSError):
            pipeline.bytes_loader(bad)
    pipeline.bytes_loader(write_jpeg_with_corrupt_scan(tmp_path / "scan.JPEG"))  # left to the device stage


def test_gpu_pipeline_file_bytes_cross_from_a_loader_worker(image_folder):
    """torchvision.io.read_file's tensor claims to be in shared memory and is not: a worker that sent it failed
    to pickle it in its queue thread, and the main process waited forever (timeout=60 turns that into an error)."""
    train_set, _ = data.image_folders(image_folder, None, None, loaders=(pipeline.bytes_loader, None))
    loader = torch.utils.data.DataLoader(train_set, batch_size=4, num_workers=1, timeout=60,
                                         collate_fn=pipeline.collate_bytes)
    files, labels = next(iter(loader))
    path, label = train_set.samples[0]
    with open(path, "rb") as handle:
        assert files[0].path == path and bytes(files[0].data.numpy()) == handle.read() and labels[0] == label


@pytest.fixture(scope="module")
def bad_jpeg_folder(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("badjpeg"), train_per_class=7, val_per_class=2)
    bad = [write_truncated_jpeg(os.path.join(root, "train", "n01_red", "truncated.JPEG")),
           write_random_bytes(os.path.join(root, "train", "n02_green", "foreign.JPEG")),
           write_jpeg_with_corrupt_scan(os.path.join(root, "train", "n03_blue", "scan.JPEG")),
           write_random_bytes(os.path.join(root, "val", "n01_red", "foreign.JPEG")),
           write_jpeg_with_corrupt_scan(os.path.join(root, "val", "n02_green", "scan.JPEG"))]
    return root, bad


def test_gpu_pipeline_counts_replaces_and_skips_unreadable_images(bad_jpeg_folder, tmp_path):
    """--pipeline gpu (its device code on the CPU): the workers' header check and the device stage's decode
    each catch some of the broken files, and the run counts them as the other pipelines do."""
    root, bad = bad_jpeg_folder
    summary = run_main_in_process(root, *tiny_flags(tmp_path, "--epochs", "2", "-j", "1", "--seed", "0",
                                                    "--pipeline", "gpu", "--fast-val"))
    log = (tmp_path / "train.log").read_text()
    for path in bad:
        assert log.count(path) == 1, log
    assert [h["train_skipped_images"] for h in summary["history"]] == [3, 3]
    assert summary["train_steps"] == 2 * (24 // 8)  # replaced, not dropped
    assert summary["val_images"] == 6 and summary["val_skipped_images"] == 2
    assert "(6 images scored, 2 unreadable skipped)" in log


CROP = 48


def _photo(path, width, height, seed, mode="RGB"):
    """Smooth colour gradients, an edge and sensor-like noise: what JPEG and resampling see in photos."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    pixels = np.stack([128 + 100 * np.sin(6 * x + 3 * y), 120 + 90 * np.cos(4 * y + 2 * x),
                       30 + 200 * x * y + 60 * (x > 0.6)], axis=2)
    pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, quality=92)
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Small ones (no reduced decode possible for a 48 px crop) and large ones (decoded at 1/2 to 1/8)."""
    root = tmp_path_factory.mktemp("photos")
    return [_photo(root / f"{i}.JPEG", w, h, i, mode) for i, (w, h, mode) in
            enumerate([(80, 60, "RGB"), (64, 90, "L"), (500, 375, "RGB"), (420, 640, "RGB")])]


def _as_pixels(normalised):
    """Normalised float image -> 0..255 pixel scale, to state tolerances in grey levels."""
    mean = torch.tensor(transforms.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(transforms.IMAGENET_STD).view(3, 1, 1)
    return (normalised * std + mean) * 255


def _draws(transform, arg, seeds):
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(transform(arg))
    return out


def _standard_train(path):
    return transforms.train_transform(CROP, scale=(0.08, 1.0))(Image.open(path))


@pytest.mark.parametrize("fast, mean_levels", [
    (transforms.FastTrain(CROP, draft=False, small="pil"), 0.5),   # one resize(box=) instead of crop + resize
    (transforms.TensorTrain(CROP), 0.5),                           # torchvision.io decode, tensor antialias resize
    (transforms.FastTrain(CROP), 2.0),                             # + reduced-size JPEG decode
])
def test_fast_train_crops_match_standard(photos, fast, mean_levels):
    for path in photos:
        seeds = range(6)
        for plain, quick in zip(_draws(_standard_train, path, seeds), _draws(fast, path, seeds)):
            assert quick.dtype == torch.uint8 and quick.shape == (3, CROP, CROP)
            diff = (_as_pixels(plain) - quick.float()).abs()
            # A wrong crop box or flip moves the mean by tens of levels on these gradients.
            assert diff.mean() < mean_levels, path


def test_fast_val_keeps_standard_pixels_unless_asked(photos):
    for path in photos:
        plain = _as_pixels(transforms.val_transform(56, CROP)(Image.open(path)))
        assert (plain - transforms.FastVal(56, CROP)(path).float()).abs().max() < 1e-3
        assert (plain - transforms.FastVal(56, CROP, fast=True)(path).float()).abs().mean() < 2.0
        assert (plain - transforms.TensorVal(56, CROP)(path).float()).abs().mean() < 1.0


def test_device_normalisation_equals_worker_normalisation(photos):
    uint8 = torch.stack([transforms.FastVal(56, CROP)(p) for p in photos])
    floats = torch.stack([transforms.val_transform(56, CROP)(Image.open(p)) for p in photos])
    images, labels = prefetch.ToDevice(cpu_runtime())((uint8, torch.arange(4)))
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64
    torch.testing.assert_close(images, floats, rtol=0, atol=1e-5)
    moved, _ = prefetch.ToDevice(cpu_runtime())((floats, torch.arange(4)))
    assert torch.equal(moved, floats)


def test_device_decode_equals_worker_decode(photos):
    """The gpu pipeline's code, run on the CPU: batched decode + augmentation = the tensor pipeline's."""
    png = os.path.join(os.path.dirname(photos[0]), "png.png")
    Image.open(photos[0]).save(png)
    photos = [*photos, png]  # not a JPEG: decoded on the host
    raw = [pipeline.bytes_loader(p) for p in photos]
    runtime = cpu_runtime()
    torch.manual_seed(3)
    decoded, _ = prefetch.DeviceDecode(runtime, True, CROP)((raw, torch.arange(5)))
    torch.manual_seed(3)
    expected = torch.stack([transforms.TensorTrain(CROP)(p) for p in photos])
    torch.testing.assert_close(decoded, prefetch.ToDevice(runtime).normalize(expected.float()), rtol=0, atol=1e-5)
    val, _ = prefetch.DeviceDecode(runtime, False, CROP, resize_size=56)((raw, torch.arange(5)))
    expected = torch.stack([transforms.TensorVal(56, CROP)(p) for p in photos])
    torch.testing.assert_close(val, prefetch.ToDevice(runtime).normalize(expected.float()), rtol=0, atol=1e-5)


def _losses(image_folder, name, steps=3):
    args = types.SimpleNamespace(min_crop_scale=0.35, train_crop_size=CROP, val_resize_size=56, val_crop_size=CROP,
                                 interpolation="bilinear", auto_augment=None, random_erase=0.0)
    (train_tf, read), _ = pipeline.build(name, args)
    train_set, _ = data.image_folders(image_folder, train_tf, None, loaders=(read, read))
    runtime = cpu_runtime()
    loader = data.build_loader(train_set, 8, 0, sampler=data.TrainSampler(train_set, 1, 0, 0), drop_last=True, seed=0,
                               collate_fn=pipeline.collate_bytes if name == "gpu" else None)
    transfer = prefetch.DeviceDecode(runtime, True, CROP, (0.35, 1.0)) if name == "gpu" else None
    torch.manual_seed(0)
    # BatchNorm on running statistics: batch statistics of 2x2 feature maps from 8 images turn 1e-6 input
    # differences into 1e-2 loss differences within two steps, which would hide what this test compares.
    model = mnasnet.ARCHS["mnasnet0_5"](num_classes=3).to(memory_format=runtime.memory_format).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    losses = []
    torch.manual_seed(1)
    for step, (images, target) in enumerate(prefetch.DeviceLoader(loader, runtime, transfer)):
        if step == steps:
            break
        loss = torch.nn.functional.cross_entropy(model(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_fast_pipelines_train_like_the_standard_one(image_folder):
    plain = _losses(image_folder, "standard")
    for name in ("fast", "tensor", "gpu"):
        assert _losses(image_folder, name) == pytest.approx(plain, rel=1e-3), name


# The code that turns a file into the network's input under each --pipeline (with --fast-val), in training and in
# validation; fast, the default, has its own (FastTrain, FastVal).
PIPELINE_STAGES = {"standard": {"RandomResizedCrop", "CenterCrop"},  # torchvision's PIL transforms, in the workers
                   "tensor": {"TensorTrain", "TensorVal"},  # torchvision.io decode, uint8 tensors, in the workers
                   "gpu": {"DeviceDecode train", "DeviceDecode val"}}  # the workers read bytes, the device decodes


def _record_stages(patch, stages):
    """Add to ``stages`` the name of each stage of PIPELINE_STAGES, or of the fast pipeline, as it runs."""
    def record(cls, method, stage):
        original = getattr(cls, method)

        def recorded(self, *args, **kwargs):
            stages.add(stage(self))
            return original(self, *args, **kwargs)
        patch.setattr(cls, method, recorded)
    record(T.RandomResizedCrop, "forward", lambda self: "RandomResizedCrop")
    record(T.CenterCrop, "forward", lambda self: "CenterCrop")
    for cls in (transforms.FastTrain, transforms.FastVal, transforms.TensorTrain, transforms.TensorVal):
        record(cls, "__call__", lambda self: type(self).__name__)
    record(prefetch.DeviceDecode, "__call__", lambda self: f"DeviceDecode {'train' if self.train else 'val'}")


def _pipeline_run(image_folder, output_dir, name):
    """Two steps and a validation with --pipeline NAME: the summary, the stages that ran, and the batches the
    network was given in training and in validation (where it is a BatchNorm-folded torch.fx copy)."""
    stages, batches = set(), {True: [], False: []}

    def record_input(module, args):
        if isinstance(module, (mnasnet.MNASNet, torch.fx.GraphModule)):
            batches[module.training].append(args[0])

    with pytest.MonkeyPatch.context() as patch:
        _record_stages(patch, stages)
        hook = torch.nn.modules.module.register_module_forward_pre_hook(record_input)
        try:
            # --seed 0: the same training images, in the same order, in every run.
            summary = run_main_in_process(image_folder, *tiny_flags(output_dir, "--epochs", "1", "--max-steps", "2",
                                                                    "--seed", "0", "--pipeline", name, "--fast-val",
                                                                    "--no-checkpoint"))
        finally:
            hook.remove()
    return summary, stages, batches[True], torch.cat(batches[False])


@pytest.fixture(scope="module")
def standard_first_batch(image_folder, tmp_path_factory):
    """The first training batch the standard pipeline gives the network."""
    _, _, train, _ = _pipeline_run(image_folder, tmp_path_factory.mktemp("standard"), "standard")
    return train[0]


@pytest.mark.parametrize("name", ["standard", "tensor", "gpu"])
def test_each_pipeline_trains_and_validates_through_main(image_folder, tmp_path, name, standard_first_batch):
    summary, stages, train, val = _pipeline_run(image_folder, tmp_path, name)
    assert summary["val_images"] == 15 and summary["train_steps"] == 2
    # That pipeline's code made the training and the validation images, and no other pipeline's did.
    assert stages == PIPELINE_STAGES[name]
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["val_loss"])
    # Validation draws no random numbers: the network is given the standard pipeline's pixels (tiny_flags' resize
    # 52, centre crop 48), normalised, less than two levels of 255 apart (resampling rounds differently).
    val_set = torchvision.datasets.ImageFolder(os.path.join(image_folder, "val"), transforms.val_transform(52, 48))
    expected = torch.stack([image for image, _ in val_set])
    torch.testing.assert_close(val, expected, rtol=0, atol=2 / (255 * min(transforms.IMAGENET_STD)))
    # Training: the same images, cropped as each pipeline draws its crops (gpu on the device, with other random
    # numbers): each channel's mean over the first batch is the standard pipeline's (measured: gpu 0.006 off).
    torch.testing.assert_close(train[0].mean(dim=(0, 2, 3)), standard_first_batch.mean(dim=(0, 2, 3)), rtol=0,
                               atol=0.05)
