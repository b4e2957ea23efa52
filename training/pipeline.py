"""Input pipelines that hand uint8 images to the device, where they are normalised (prefetch.py).

``--pipeline`` picks one (bench.py measures them all):

- ``standard``: torchvision's PIL transforms, normalised float32 batches from the workers (the reference).
- ``fast``: a JPEG whose random crop is at least twice the output size is decoded by PIL at 1/2, 1/4 or 1/8
  scale (``draft()``) and cropped + resized in one ``resize(box=...)``; other images are decoded by
  ``torchvision.io`` and cropped + resized as uint8 tensors (faster than PIL at 300-500 px); uint8 out.
- ``tensor``: ``torchvision.io`` decode and tensor crop/resize on uint8 tensors.
- ``gpu``: workers read the file bytes and check the header (``check_encoded``); JPEGs are decoded and augmented
  on the device (prefetch.py).

Every pipeline draws its random numbers as torchvision's RandomResizedCrop + RandomHorizontalFlip do
(crop parameters, then one ``torch.rand(1)`` for the flip), so with the same seed all give the same crops.
Validation keeps the standard pixels (PIL resize, centre crop, uint8 out) unless ``fast_val`` is set.
"""
from io import BytesIO
from typing import NamedTuple

import torch
from PIL import Image
from torchvision.datasets.folder import default_loader

from training import transforms

PIPELINES = ("standard", "fast", "tensor", "gpu")


def path_loader(path):
    """The dataset hands the transform the path: draft() and torchvision.io decode from the file themselves."""
    return path


class EncodedFile(NamedTuple):
    """An image file's bytes as the ``gpu`` pipeline's workers hand them on, with the path for error messages."""
    data: torch.Tensor
    path: str


def bytes_loader(path):
    """The file's bytes, after a header check: the device decodes them in the main process, so the worker
    (whose errors data.py's guard catches, counts and replaces) turns away what is plainly unreadable."""
    with open(path, "rb") as handle:
        raw = handle.read()
    check_encoded(raw)
    return EncodedFile(torch.frombuffer(bytearray(raw), dtype=torch.uint8), path)


def check_encoded(raw):
    """Raise OSError (via PIL) unless ``raw`` starts like an image PIL knows, with a non-empty size. A JPEG (MPO:
    a camera's multi-picture JPEG) must also end: its last end-of-image marker must follow its last start-of-scan
    one, which a truncated file lacks (inside compressed data 0xFF is always escaped, so neither marker occurs
    there). Reads the header only, not the pixels: corrupt compressed data passes, and DeviceDecode handles it."""
    with Image.open(BytesIO(raw)) as img:
        width, height = img.size
        kind = img.format
    if not width or not height:
        raise OSError(f"{kind} header gives an empty size {width}x{height}")
    if kind in ("JPEG", "MPO") and not raw.rfind(b"\xff\xd9") > raw.rfind(b"\xff\xda") >= 0:
        raise OSError("truncated JPEG: no end-of-image marker after the last scan")


def collate_bytes(batch):
    """File bytes differ in length: a list of EncodedFile, and the labels as one tensor."""
    return [item[0] for item in batch], torch.tensor([item[1] for item in batch])


def build(name, args, fast_val=False):
    """((train transform, train file reader), (val transform, val file reader)) for --pipeline NAME.

    For ``gpu`` the transforms are None: the workers read bytes and the device decodes (prefetch.DeviceDecode)."""
    scale = (args.min_crop_scale, 1.0)
    crop, resize, val_crop = args.train_crop_size, args.val_resize_size, args.val_crop_size
    interpolation = args.interpolation
    if name == "standard":
        return ((transforms.train_transform(crop, scale, args.auto_augment, args.random_erase), default_loader),
                (transforms.val_transform(resize, val_crop, interpolation), default_loader))
    val = (transforms.FastVal(resize, val_crop, fast=fast_val, interpolation=interpolation), path_loader)
    if name == "fast":
        return (transforms.FastTrain(crop, scale), path_loader), val
    if name == "tensor":
        tensor_val = (transforms.TensorVal(resize, val_crop, interpolation), path_loader)
        return (transforms.TensorTrain(crop, scale), path_loader), tensor_val if fast_val else val
    if name == "gpu":
        return (None, bytes_loader), (None, bytes_loader) if fast_val else val
    raise ValueError(name)
