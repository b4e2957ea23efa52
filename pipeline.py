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
import math
import warnings
from io import BytesIO
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import io, transforms
from torchvision.datasets.folder import default_loader
from torchvision.transforms.v2 import functional as F

import data

# requirements.txt pins torchvision 0.29, whose image decoders work and are deprecated in favour of
# TorchCodec's; moving to those is for when the pin moves, and the warning would repeat in every worker.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

PIPELINES = ("standard", "fast", "tensor", "gpu")
RATIO = (3.0 / 4.0, 4.0 / 3.0)


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


def _pil_to_uint8(img):
    img = img if img.mode == "RGB" else img.convert("RGB")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _draft_scale(box, out_size):
    left, top, right, bottom = box
    return min((right - left) / out_size[0], (bottom - top) / out_size[1])


def _draft(img, box, out_size):
    """Ask the JPEG decoder for the smallest scale at which ``box`` still covers ``out_size``; returns
    the box in the (possibly) reduced image's coordinates."""
    shrink = _draft_scale(box, out_size)
    if img.format != "JPEG" or shrink < 2:
        return box
    width, height = img.size
    img.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
    sx, sy = img.size[0] / width, img.size[1] / height
    left, top, right, bottom = box
    return left * sx, top * sy, right * sx, bottom * sy


def _flip(img):
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else img


class FastTrain:
    """RandomResizedCrop + horizontal flip from an image path, uint8 out.

    ``draft``: a JPEG crop at least twice the output size is decoded by PIL at 1/2, 1/4 or 1/8 scale and
    cropped + resized in one ``resize(box=...)``. Other crops go through torchvision.io decode and a tensor
    resize (``small="tensor"``, faster than PIL's at ImageNet's typical 300-500 px) or PIL (``small="pil"``).
    """

    def __init__(self, size, scale=(0.08, 1.0), draft=True, small="tensor"):
        self.size = (size, size)
        self.scale = scale
        self.draft = draft
        self.small = small

    def __call__(self, path):
        with _open(path) as img:
            # get_params reads only the header's size, so the decoder can still be told to shrink.
            top, left, height, width = transforms.RandomResizedCrop.get_params(img, self.scale, RATIO)
            box = (left, top, left + width, top + height)
            drafted = self.draft and img.format == "JPEG" and _draft_scale(box, self.size) >= 2
            if drafted or self.small == "pil":
                if drafted:
                    box = _draft(img, box, self.size)
                _load(img, path)
                img = img if img.mode == "RGB" else img.convert("RGB")
                return _pil_to_uint8(_flip(img.resize(self.size, Image.BILINEAR, box=box)))
        out = F.resized_crop(decode(path), top, left, height, width, list(self.size), antialias=True)
        return F.horizontal_flip(out) if torch.rand(1) < 0.5 else out


class FastVal:
    """Resize the shorter side, centre crop; uint8 out, the standard PIL pixels. ``fast`` (not the standard
    pixels, so only on request): JPEGs at least twice the resize are decoded by PIL at reduced scale, others
    by torchvision.io with a tensor resize."""

    def __init__(self, resize_size, crop_size, fast=False, interpolation="bilinear"):
        self.resize_size = resize_size
        self.crop_size = crop_size
        self.fast = fast
        self.interpolation = interpolation

    def __call__(self, path):
        with _open(path) as img:
            width, height = img.size
            shorter = min(width, height)
            target = (self.resize_size * width / shorter, self.resize_size * height / shorter)
            drafted = self.fast and img.format == "JPEG" and _draft_scale((0, 0, width, height), target) >= 2
            if drafted or not self.fast:
                if drafted:
                    _draft(img, (0, 0, width, height), target)
                _load(img, path)
                img = img if img.mode == "RGB" else img.convert("RGB")
                resized = transforms.functional.resize(img, self.resize_size,
                                                       interpolation=data.interpolation_mode(self.interpolation))
                return _pil_to_uint8(transforms.functional.center_crop(resized, self.crop_size))
        return resize_center_crop(decode(path), self.resize_size, self.crop_size, self.interpolation)


def _open(path):
    """The file's header, read by PIL (data.UnreadableImage if it is not an image)."""
    with data.decoding(path):
        return Image.open(path)


def _load(img, path):
    """Decode the pixels (after any draft()), so that what fails here is the file, not a later transform."""
    with data.decoding(path):
        img.load()


def decode(path_or_bytes):
    """RGB uint8 CHW (the first frame of an animation) from a path or the file's bytes: torchvision.io for the
    formats it decodes (JPEG, PNG, WebP, GIF), PIL for the others ImageFolder lists (BMP, TIFF, PPM/PGM) and
    for files torchvision.io refuses; data.UnreadableImage when neither can read it."""
    source = path_or_bytes if isinstance(path_or_bytes, str) else "image bytes"
    with data.decoding(source):
        raw = io.read_file(path_or_bytes) if isinstance(path_or_bytes, str) else path_or_bytes
        try:
            image = io.decode_image(raw, mode=io.ImageReadMode.RGB)
        except RuntimeError:
            with Image.open(BytesIO(raw.numpy().tobytes())) as img:
                return _pil_to_uint8(img)
    return image[0] if image.ndim == 4 else image


def random_resized_crop_flip(image, size, scale):
    top, left, height, width = transforms.RandomResizedCrop.get_params(image, scale, RATIO)
    out = F.resized_crop(image, top, left, height, width, [size, size], antialias=True)
    return F.horizontal_flip(out) if torch.rand(1) < 0.5 else out


def resize_center_crop(image, resize_size, crop_size, interpolation="bilinear"):
    resized = F.resize(image, resize_size, interpolation=data.interpolation_mode(interpolation), antialias=True)
    return F.center_crop(resized, [crop_size, crop_size])


class TensorTrain:
    def __init__(self, size, scale=(0.08, 1.0)):
        self.size = size
        self.scale = scale

    def __call__(self, path):
        return random_resized_crop_flip(decode(path), self.size, self.scale)


class TensorVal:
    def __init__(self, resize_size, crop_size, interpolation="bilinear"):
        self.resize_size = resize_size
        self.crop_size = crop_size
        self.interpolation = interpolation

    def __call__(self, path):
        return resize_center_crop(decode(path), self.resize_size, self.crop_size, self.interpolation)


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
        return ((data.train_transform(crop, scale, args.auto_augment, args.random_erase), default_loader),
                (data.val_transform(resize, val_crop, interpolation), default_loader))
    val = (FastVal(resize, val_crop, fast=fast_val, interpolation=interpolation), path_loader)
    if name == "fast":
        return (FastTrain(crop, scale), path_loader), val
    if name == "tensor":
        tensor_val = (TensorVal(resize, val_crop, interpolation), path_loader)
        return (TensorTrain(crop, scale), path_loader), tensor_val if fast_val else val
    if name == "gpu":
        return (None, bytes_loader), (None, bytes_loader) if fast_val else val
    raise ValueError(name)
