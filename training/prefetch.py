"""Batches on the device, ready for the model: copied, decoded and normalised off the critical path.

On CUDA/NPU the next batch is copied (and normalised, or decoded) on a side stream while the current step
runs; on the CPU the same code runs inline. uint8 images are normalised on the device, so the workers
and the host-to-device copy move a quarter of the bytes of float32 batches.
"""
import re
import time

import torch
from torchvision import io

from training import data, devices, transforms
from training.utils import UserError


class ToDevice:
    """Loader batch -> (images, labels) on the device: images float32 normalised in the runtime's memory
    format, labels in the dtype the device wants. Float images (the standard pipeline, --dummy) are only moved.

    ``skipped``: unreadable images this stage met in the current pass (DeviceDecode's; files the workers could
    not read are data.CheckedLoader's)."""

    skipped = 0

    def __init__(self, runtime):
        self.runtime = runtime
        # Made on the current stream; DeviceLoader's side stream waits for it before its first use.
        self.mean = torch.tensor(transforms.IMAGENET_MEAN, device=runtime.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(transforms.IMAGENET_STD, device=runtime.device).view(1, 3, 1, 1) * 255

    def start_pass(self):
        """A new pass over the data begins (DeviceLoader.__iter__)."""

    def images(self, images):
        images = images.to(self.runtime.device, non_blocking=True, memory_format=self.runtime.memory_format)
        return self.normalize(images) if images.dtype == torch.uint8 else images

    def normalize(self, images):
        # Elementwise ops keep the input's memory format, so channels_last stays channels_last.
        return images.float().sub_(self.mean).div_(self.std)

    def labels(self, target):
        return target.to(self.runtime.device, dtype=self.runtime.label_dtype, non_blocking=True)

    def __call__(self, batch):
        images, target = drop_unscored(*batch)
        return self.images(images), self.labels(target)


def drop_unscored(images, target):
    """Validation's unreadable files (labelled SKIPPED_LABEL by the workers), dropped on the host so the device
    never waits on this test."""
    readable = target != data.SKIPPED_LABEL
    if readable.all():
        return images, target
    kept = images[readable] if torch.is_tensor(images) else [i for i, ok in zip(images, readable) if ok]
    return kept, target[readable]


class DeviceDecode(ToDevice):
    """The ``gpu`` pipeline: the loader yields pipeline.EncodedFile's; decode them on the device in one batched
    call and augment there (RandomResizedCrop + flip, or resize + centre crop), drawing random numbers as the
    CPU pipelines do. On the CPU the same code decodes with libjpeg (what the tests check).

    The workers checked each file's header (pipeline.check_encoded); a file that passes it and still cannot be
    decoded, on the device or then on the host, is handled as data.CheckedLoader handles the workers' failures:
    logged once (``strict``: a UserError), counted in ``skipped``, replaced in training (by another image of the
    same batch, with its label, freshly augmented) and left out in validation.

    Cost on CUDA (read from torchvision's decode_jpegs_cuda.cpp, not measured here): the batch is decoded on
    nvJPEG's own stream, which the current (DeviceLoader's side) stream then waits for, so the compute stream is
    not held up; but the call returns only when that stream is done (cudaStreamSynchronize), and progressive
    JPEGs are Huffman-decoded on the host, so the training thread blocks for each batch's decode, one batch
    ahead of the step it feeds."""

    def __init__(self, runtime, train, size, scale=(0.08, 1.0), resize_size=None, strict=False, log=None,
                 interpolation="bilinear"):
        super().__init__(runtime)
        self.train = train
        self.size = size
        self.scale = scale
        self.resize_size = resize_size
        self.interpolation = interpolation
        self.strict = strict
        self.log = log
        self._failed = set()
        self._reported = set()

    @property
    def skipped(self):
        return len(self._failed)

    def start_pass(self):
        self._failed = set()

    def __call__(self, batch):
        files, target = drop_unscored(*batch)
        decoded = self._decode_batch(files)
        readable = [i for i, image in enumerate(decoded) if image is not None]
        if len(readable) < len(decoded):
            if not self.train:
                decoded = [decoded[i] for i in readable]
                target = target[readable]
            elif readable:
                sources = [i if image is not None else readable[i % len(readable)] for i, image in enumerate(decoded)]
                decoded = [decoded[i] for i in sources]
                target = target[sources]
            else:
                raise UserError(f"no image of a training batch can be decoded, e.g. {files[0].path}")
        if not decoded:
            return torch.empty(0, 3, self.size, self.size, device=self.runtime.device), self.labels(target)
        if self.train:
            out = [transforms.random_resized_crop_flip(img, self.size, self.scale) for img in decoded]
        else:
            out = [transforms.resize_center_crop(img, self.resize_size, self.size, self.interpolation)
                   for img in decoded]
        images = torch.stack(out).contiguous(memory_format=self.runtime.memory_format)
        return self.normalize(images), self.labels(target)

    def _decode_batch(self, files):
        """Decoded uint8 CHW images on the device, None for a file that cannot be decoded."""
        if not files:
            return []  # a validation batch whose files the workers all turned away (decode_jpeg refuses [])
        try:
            return self._decode([f.data for f in files])
        except torch.OutOfMemoryError:
            raise  # the device's memory, not the files
        except RuntimeError:
            # A PNG, or a JPEG the device decoder refuses (ImageNet holds a few CMYK ones), or a corrupt one:
            # one at a time, and on the host for those.
            return [self._decode_one(f) for f in files]

    def _decode(self, raw):
        return io.decode_jpeg(raw, mode=io.ImageReadMode.RGB, device=self.runtime.device)

    def _decode_one(self, encoded):
        try:
            return self._decode(encoded.data)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            device_error = exc
        try:
            return transforms.decode(encoded.data).to(self.runtime.device, non_blocking=True)
        except data.UnreadableImage:
            # The JPEG decoder's reason names what is broken ("Unsupported marker type"); PIL's is vaguer.
            self._unreadable(encoded.path, _decoder_message(device_error))
            return None

    def _unreadable(self, path, reason):
        self._failed.add(path)
        if path in self._reported:
            return
        self._reported.add(path)
        if self.strict:
            raise UserError(f"cannot read image {path}: {reason} (--strict-data)")
        if self.log is not None:
            self.log.warning(f"=> skipped unreadable image {path}: {reason}")


def _decoder_message(exc):
    # torchvision's messages start with where they were raised: "decode_jpeg, /path/decode_jpeg.cpp:171, ...".
    lines = str(exc).strip().splitlines()
    return re.sub(r"^\w+, \S+:\d+, ", "", lines[-1]) if lines else type(exc).__name__


class DeviceLoader:
    """Iterates ``loader``, yielding ``transfer(batch)``; on CUDA/NPU batch k+1 is prepared on a side stream
    while the caller computes on batch k.

    ``copy_seconds``: host time spent in ``transfer`` calls so far (meters.StepBreakdown's copy time). On CUDA/NPU
    that is issuing the copy (and the device normalisation or decode) to the side stream, not the transfer itself,
    which overlaps the compute; on the CPU it is the whole device stage, run inline."""

    def __init__(self, loader, runtime, transfer=None):
        self.loader = loader
        self.runtime = runtime
        self.transfer = transfer or ToDevice(runtime)
        self.copy_seconds = 0.0

    def __len__(self):
        return len(self.loader)

    @property
    def skipped(self):
        """Unreadable images skipped in the latest pass: by the workers (data.CheckedLoader) and by the device
        stage (DeviceDecode)."""
        return self.loader.skipped + self.transfer.skipped

    def __iter__(self):
        self.transfer.start_pass()
        module = devices.device_module(self.runtime.kind)
        if module is None:
            for batch in self.loader:
                yield self._timed_transfer(batch)
            return
        stream = module.Stream(self.runtime.device)
        # What the current stream made before (the transfer's mean and std, the first time) is ready before
        # the side stream reads it.
        stream.wait_stream(module.current_stream(self.runtime.device))
        batches = iter(self.loader)
        ready = self._prepare(batches, stream, module)
        while ready is not None:
            current = module.current_stream(self.runtime.device)
            current.wait_stream(stream)
            for tensor in ready:
                # Made on the side stream, used on this one: the allocator must not reuse it too early.
                tensor.record_stream(current)
            images, target = ready
            ready = self._prepare(batches, stream, module)
            yield images, target

    def _prepare(self, batches, stream, module):
        batch = next(batches, None)
        if batch is None:
            return None
        with module.stream(stream):
            return self._timed_transfer(batch)

    def _timed_transfer(self, batch):
        start = time.perf_counter()
        moved = self.transfer(batch)
        self.copy_seconds += time.perf_counter() - start
        return moved
