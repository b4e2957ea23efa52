"""Image transforms: torchvision's PIL ones (the standard pipeline), mixup/cutmix, and the uint8 ones of the
fast pipelines (PIL draft() and torchvision.io decode), which draw their random numbers as torchvision's
RandomResizedCrop + RandomHorizontalFlip do."""
import math
import warnings
from io import BytesIO

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision import io
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from training import data

# requirements.txt pins torchvision 0.29, whose image decoders work and are deprecated in favour of
# TorchCodec's; moving to those is for when the pin moves, and the warning would repeat in every worker.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_rgb(img):
    return img if img.mode == "RGB" else img.convert("RGB")


AUTO_AUGMENT = {"ta_wide": v2.TrivialAugmentWide, "ra": v2.RandAugment}


def train_transform(crop_size, scale=(0.08, 1.0), auto_augment=None, random_erase=0.0):
    """RandomResizedCrop and flip, optionally TrivialAugmentWide / RandAugment and RandomErasing (after
    normalisation, filling with 0, the mean)."""
    steps = [T.Lambda(_to_rgb), T.RandomResizedCrop(crop_size, scale=scale),
             T.RandomHorizontalFlip()]
    if auto_augment:
        steps.append(AUTO_AUGMENT[auto_augment]())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if random_erase > 0:
        steps.append(v2.RandomErasing(p=random_erase, value=0))
    return T.Compose(steps)


def batch_mix(num_classes, mixup_alpha=0.0, cutmix_alpha=0.0):
    """MixUp and/or CutMix (one of the two, at random, per batch) on a batch already on the device, returning
    soft targets for the loss; None when both are off."""
    choices = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    mix = v2.RandomChoice(choices)

    def apply(images, target):
        return mix(images, target.long())  # one-hot encoding needs int64 labels (NPU labels are int32)
    return apply


# --interpolation's choices: the resampling of validation's resize (torchvision's and timm's weights differ).
INTERPOLATIONS = ("bilinear", "bicubic")


def interpolation_mode(name):
    return T.InterpolationMode(name)


def val_transform(resize_size, crop_size, interpolation="bilinear"):
    return T.Compose([
        T.Lambda(_to_rgb),
        T.Resize(resize_size, interpolation=interpolation_mode(interpolation)),
        T.CenterCrop(crop_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


RATIO = (3.0 / 4.0, 4.0 / 3.0)


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
    --pipeline fast uses the defaults; the other settings are bench.py's comparisons of the decode paths.
    """

    def __init__(self, size, scale=(0.08, 1.0), draft=True, small="tensor"):
        self.size = (size, size)
        self.scale = scale
        self.draft = draft
        self.small = small

    def __call__(self, path):
        with _open(path) as img:
            # get_params reads only the header's size, so the decoder can still be told to shrink.
            top, left, height, width = T.RandomResizedCrop.get_params(img, self.scale, RATIO)
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
                resized = T.functional.resize(img, self.resize_size,
                                                       interpolation=interpolation_mode(self.interpolation))
                return _pil_to_uint8(T.functional.center_crop(resized, self.crop_size))
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
    top, left, height, width = T.RandomResizedCrop.get_params(image, scale, RATIO)
    out = F.resized_crop(image, top, left, height, width, [size, size], antialias=True)
    return F.horizontal_flip(out) if torch.rand(1) < 0.5 else out


def resize_center_crop(image, resize_size, crop_size, interpolation="bilinear"):
    resized = F.resize(image, resize_size, interpolation=interpolation_mode(interpolation), antialias=True)
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
