"""Each fast input path against the plain one: same crops and pixels (within resampling tolerance) for the same
random numbers, the same normalised batches on the device, the same loss trajectory."""
import contextlib
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

import mnasnet
from helpers import cpu_runtime
from training import data, devices, pipeline, prefetch, transforms

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


def test_side_stream_prefetch_yields_the_inline_batches(monkeypatch):
    """The CUDA/NPU branch with a stand-in stream API: same batches, and every one is handed to the compute
    stream (wait_stream, record_stream) before use."""
    events = []
    stream = types.SimpleNamespace(wait_stream=lambda s: events.append("wait"))
    side = types.SimpleNamespace(wait_stream=lambda s: events.append("side waits"))
    fake = types.SimpleNamespace(Stream=lambda dev: side, current_stream=lambda dev=None: stream,
                                 stream=lambda s: contextlib.nullcontext())
    monkeypatch.setattr(devices, "device_module", lambda kind: fake if kind == "fake" else None)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: events.append("record"), raising=False)
    batches = [(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), torch.tensor([1, 2])) for _ in range(3)]
    inline = list(prefetch.DeviceLoader(batches, cpu_runtime()))
    runtime = cpu_runtime()
    runtime.kind = "fake"
    prefetched = list(prefetch.DeviceLoader(batches, runtime))
    assert len(prefetched) == 3 and events == ["side waits"] + ["wait", "record", "record"] * 3
    for (a, b), (c, d) in zip(inline, prefetched):
        assert torch.equal(a, c) and torch.equal(b, d)


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
