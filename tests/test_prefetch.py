"""training/prefetch.py: decoding on the device and the side-stream prefetcher."""
import contextlib
import types

import pytest
import torch

from helpers import cpu_runtime, write_jpeg, write_jpeg_with_corrupt_scan
from training import data, devices, pipeline, prefetch
from training.utils import UserError


def test_device_decode_replaces_in_training_and_drops_in_validation(tmp_path, caplog):
    paths = [write_jpeg(tmp_path / "a.JPEG", 1), write_jpeg_with_corrupt_scan(tmp_path / "bad.JPEG"),
             write_jpeg(tmp_path / "c.JPEG", 2)]
    files = [pipeline.bytes_loader(p) for p in paths]
    log = types.SimpleNamespace(warning=lambda message: logged.append(message))
    logged = []
    train = prefetch.DeviceDecode(cpu_runtime(), True, 32, log=log)
    train.start_pass()
    images, labels = train((files, torch.tensor([0, 1, 2])))
    # The unreadable second image is replaced by a readable one of the batch, label and all.
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [0, 2, 2]
    assert train.skipped == 1 and len(logged) == 1 and paths[1] in logged[0] and "marker" in logged[0]
    train((files, torch.tensor([0, 1, 2])))
    assert train.skipped == 1 and len(logged) == 1  # counted once a pass, logged once a run
    train.start_pass()
    assert train.skipped == 0
    val = prefetch.DeviceDecode(cpu_runtime(), False, 32, resize_size=36)
    images, labels = val((files, torch.tensor([0, 1, 2])))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 2] and val.skipped == 1
    with pytest.raises(UserError, match="--strict-data"):
        prefetch.DeviceDecode(cpu_runtime(), True, 32, strict=True)((files, torch.tensor([0, 1, 2])))


def test_a_validation_batch_of_unscored_files_only_is_empty(tmp_path):
    """The workers turned away every file of the batch (a rank's last batch of one, say): no images, no error."""
    files = [pipeline.bytes_loader(write_jpeg(tmp_path / "a.JPEG", 1))]
    val = prefetch.DeviceDecode(cpu_runtime(), False, 32, resize_size=36)
    images, labels = val((files, torch.tensor([data.SKIPPED_LABEL])))
    assert images.shape == (0, 3, 32, 32) and len(labels) == 0


def _recording_streams(monkeypatch, events):
    """torch.cuda's stream API as DeviceLoader uses it (Stream, current_stream, stream(), wait_stream,
    record_stream), recording who waits for whom."""
    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    compute, side = Stream("compute"), Stream("side")
    fake = types.SimpleNamespace(Stream=lambda dev: side, current_stream=lambda dev=None: compute,
                                 stream=lambda s: contextlib.nullcontext())
    monkeypatch.setattr(devices, "device_module", lambda kind: fake if kind == "fake" else None)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: events.append(f"record on {s.name}"),
                        raising=False)


def test_side_stream_waits_for_the_mean_and_std_before_it_first_uses_them(monkeypatch):
    """ToDevice makes its mean and std on the current stream; the side stream that normalises with them must
    wait for that stream before its first batch."""
    events = []
    _recording_streams(monkeypatch, events)
    runtime = cpu_runtime()
    runtime.kind = "fake"
    transfer = prefetch.ToDevice(runtime)

    def recorded_transfer(batch):
        events.append("transfer")
        return transfer(batch)
    recorded_transfer.skipped, recorded_transfer.start_pass = 0, lambda: None
    batches = [(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), torch.tensor([1, 2]))] * 2
    assert len(list(prefetch.DeviceLoader(batches, runtime, recorded_transfer))) == 2
    assert events.index("side waits for compute") < events.index("transfer")


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
