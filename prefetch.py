"""Batches on the device, ready for the model: copied, decoded and normalised off the critical path.

On CUDA/NPU the next batch is copied (and normalised, or decoded) on a side stream while the current step
runs; on the CPU the same code runs inline. uint8 images are normalised on the device, so the workers
and the host-to-device copy move a quarter of the bytes of float32 batches.
"""
import torch

import data
import device
import pipeline


class ToDevice:
    """Loader batch -> (images, labels) on the device: images float32 normalised in the runtime's memory
    format, labels in the dtype the device wants. Float images (the standard pipeline, --dummy) are only moved."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.mean = torch.tensor(data.IMAGENET_MEAN, device=runtime.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(data.IMAGENET_STD, device=runtime.device).view(1, 3, 1, 1) * 255

    def images(self, images):
        images = images.to(self.runtime.device, non_blocking=True, memory_format=self.runtime.memory_format)
        return self.normalize(images) if images.dtype == torch.uint8 else images

    def normalize(self, images):
        # Elementwise ops keep the input's memory format, so channels_last stays channels_last.
        return images.float().sub_(self.mean).div_(self.std)

    def __call__(self, batch):
        images, target = batch
        readable = target != data.SKIPPED_LABEL
        if not readable.all():
            # Validation's unreadable files, dropped on the host so the device never waits on this test.
            images = images[readable] if torch.is_tensor(images) else [i for i, ok in zip(images, readable) if ok]
            target = target[readable]
        target = target.to(self.runtime.device, dtype=self.runtime.label_dtype, non_blocking=True)
        return self.images(images), target


class DeviceDecode(ToDevice):
    """The ``gpu`` pipeline: the loader yields file bytes; decode them on the device in one batched call and
    augment there (RandomResizedCrop + flip, or resize + centre crop), drawing random numbers as the CPU
    pipelines do. On the CPU the same code decodes with libjpeg (what the tests check)."""

    def __init__(self, runtime, train, size, scale=(0.08, 1.0), resize_size=None):
        super().__init__(runtime)
        self.train = train
        self.size = size
        self.scale = scale
        self.resize_size = resize_size

    def images(self, raw):
        try:
            decoded = self._decode(raw)
        except RuntimeError:
            # A PNG, or a JPEG the device decoder refuses (ImageNet holds a few CMYK ones): one at a time, and
            # on the host for those.
            decoded = [self._decode_or_host(item) for item in raw]
        if self.train:
            out = [pipeline.random_resized_crop_flip(img, self.size, self.scale) for img in decoded]
        else:
            out = [pipeline.resize_center_crop(img, self.resize_size, self.size) for img in decoded]
        return self.normalize(torch.stack(out).contiguous(memory_format=self.runtime.memory_format))


    def _decode(self, raw):
        return pipeline.io.decode_jpeg(raw, mode=pipeline.io.ImageReadMode.RGB, device=self.runtime.device)

    def _decode_or_host(self, item):
        try:
            return self._decode(item)
        except RuntimeError:
            return pipeline.decode(item).to(self.runtime.device, non_blocking=True)


class DeviceLoader:
    """Iterates ``loader``, yielding ``transfer(batch)``; on CUDA/NPU batch k+1 is prepared on a side stream
    while the caller computes on batch k."""

    def __init__(self, loader, runtime, transfer=None):
        self.loader = loader
        self.runtime = runtime
        self.transfer = transfer or ToDevice(runtime)

    def __len__(self):
        return len(self.loader)

    @property
    def skipped(self):
        """Unreadable images skipped in the latest pass (data.CheckedLoader)."""
        return self.loader.skipped

    def __iter__(self):
        module = device.device_module(self.runtime.kind)
        if module is None:
            for batch in self.loader:
                yield self.transfer(batch)
            return
        stream = module.Stream(self.runtime.device)
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
            return self.transfer(batch)
