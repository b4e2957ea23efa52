"""--pretrained torchvision|timm (published weights through each library's weights API, from a pre-placed cache
file: nothing here can download), --interpolation and --crop-pct."""
import json
import os
import socket
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import classify
import main
from helpers import cpu_runtime, run_main_in_process, run_main_subprocess, tiny_flags
from training import named_weights, options, pipeline, transforms
from training.utils import UserError

TIMM_TAG = "mnasnet_100.rmsp_in1k"  # timm's only published B1; its mnasnet_050 has no weights


FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def refused_connections(monkeypatch):
    """Every connection attempt fails as an unreachable network does (and is recorded)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise ConnectionRefusedError("no network in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def torchvision_cache_file(torch_home, arch):
    """Where torchvision's weights enum looks first: $TORCH_HOME/hub/checkpoints/<the URL's file name>."""
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    folder = os.path.join(torch_home, "hub", "checkpoints")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, url.rsplit("/", 1)[-1])


def hf_cache_file(hub_cache, repo_id, file_name="model.safetensors"):
    """Where huggingface_hub's hf_hub_download looks first, offline: the snapshot that refs/main names."""
    repo = os.path.join(hub_cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as handle:
        handle.write(FAKE_COMMIT)
    snapshot = os.path.join(repo, "snapshots", FAKE_COMMIT)
    os.makedirs(snapshot, exist_ok=True)
    return os.path.join(snapshot, file_name)


def place_timm_weights(hub_cache, num_classes, tag=TIMM_TAG):
    """timm's network with random weights, saved as its hub repository's model.safetensors; the state dict."""
    import safetensors.torch
    import timm
    state = timm.create_model(tag.split(".")[0], pretrained=False, num_classes=num_classes).state_dict()
    safetensors.torch.save_file(state, hf_cache_file(hub_cache, f"timm/{tag}"))
    return state


# --- torchvision: end to end ---

def test_torchvision_weights_load_from_the_torch_hub_cache(image_folder, tmp_path, monkeypatch, refused_connections):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = torchvision_cache_file(str(tmp_path / "torch"), "mnasnet0_5")
    torch.save(torchvision.models.mnasnet0_5(weights=None, num_classes=3).state_dict(), cached)
    flags = ["-a", "mnasnet0_5", "--device", "cpu", "-j", "0", "-b", "8", "-e", "--val-crop-size", "64"]

    named = run_main_in_process(image_folder, *flags, "--pretrained", "torchvision", "--output-dir",
                                str(tmp_path / "a"))
    # The same file by its path, validated as the weights' preprocessing says (crop 64 / 0.875 = 73, bilinear).
    by_path = run_main_in_process(image_folder, *flags, "--pretrained", cached, "--val-resize-size", "73",
                                  "--interpolation", "bilinear", "--output-dir", str(tmp_path / "b"))
    log = (tmp_path / "a" / "train.log").read_text()
    assert named["val_images"] == 15
    assert named["val_loss"] == pytest.approx(by_path["val_loss"], abs=1e-6)
    assert named["val_acc1"] == by_path["val_acc1"]
    assert "loaded torchvision's MNASNet0_5_Weights.IMAGENET1K_V1 weights" in log
    assert "validation: resize 73 (crop / 0.875, weights), centre crop 64 (flag), bilinear (weights)" in log
    assert not refused_connections


def test_torchvision_weights_not_cached_and_no_network(image_folder, tmp_path, monkeypatch, refused_connections,
                                                       capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit):
        main.main([image_folder, *tiny_flags(tmp_path), "-e", "--pretrained", "torchvision"])
    # torch.hub's own 'Downloading: "URL" to FILE' notice goes to stderr before torch 2.7, to stdout since.
    error = "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                      if not line.startswith('Downloading: "'))
    assert error.startswith("error: cannot get torchvision's MNASNet0_5_Weights.IMAGENET1K_V1 (https://")
    assert "copy mnasnet0.5_top1_67.823-3ffadce67e.pth into $TORCH_HOME/hub/checkpoints" in error
    assert len(error.splitlines()) == 1 and refused_connections


# --- timm ---

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline (huggingface_hub reads both settings when it is imported: set on it)."""
    from huggingface_hub import constants
    hub_cache = str(tmp_path / "hf")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_timm_weights_come_from_the_hugging_face_cache(image_folder, tmp_path, hf_cache, monkeypatch,
                                                      refused_connections):
    placed = place_timm_weights(hf_cache, num_classes=3)
    handed_over = []
    # load_model_weights takes timm's keys on the a1model branch; here what reaches it is the point.
    monkeypatch.setattr(main.checkpoint, "load_model_weights",
                        lambda model, state, arch, source: handed_over.append((state, arch, source)))
    summary = run_main_in_process(image_folder, "-a", "mnasnet1_0", "--device", "cpu", "-j", "0", "-b", "8", "-e",
                                  "--val-crop-size", "64", "--pretrained", "timm",
                                  "--output-dir", str(tmp_path / "out"))
    log = (tmp_path / "out" / "train.log").read_text()
    (state, arch, source), = handed_over
    assert arch == "mnasnet1_0" and source == f"timm's {TIMM_TAG}"
    assert state.keys() == placed.keys() and all(torch.equal(state[k], placed[k]) for k in placed)
    # timm's pretrained_cfg: crop_pct 0.875, bicubic.
    assert "validation: resize 73 (crop / 0.875, weights), centre crop 64 (flag), bicubic (weights)" in log
    assert summary["val_images"] == 15 and not refused_connections


def test_timm_weights_missing_from_the_cache(image_folder, tmp_path, hf_cache, refused_connections, capsys):
    with pytest.raises(SystemExit):
        main.main([image_folder, *tiny_flags(tmp_path), "-a", "mnasnet1_0", "-e", "--pretrained", "timm"])
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: cannot get timm's {TIMM_TAG} (hf-hub:timm/{TIMM_TAG}): ")
    assert f"hf download timm/{TIMM_TAG}" in error and len(error.splitlines()) == 1 and not refused_connections


@pytest.mark.parametrize("arch, tag", [("mnasnet1_0", TIMM_TAG), ("mnasnet_a1_0_75", "semnasnet_075.rmsp_in1k")])
def test_timm_weights_end_to_end(image_folder, tmp_path, arch, tag):
    """-e with timm's weights scores what timm's own model does on the same pixels (bicubic, crop / 0.875)."""
    import timm
    hub_cache = str(tmp_path / "hf")
    place_timm_weights(hub_cache, num_classes=3, tag=tag)
    env = {**os.environ, "HF_HUB_CACHE": hub_cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    summary_path = tmp_path / "summary.json"
    result = run_main_subprocess(image_folder, "-a", arch, "--device", "cpu", "-j", "0", "-b", "8", "-e",
                                 "--val-crop-size", "64", "--pretrained", "timm", "--output-dir", str(tmp_path / "out"),
                                 "--summary-json", str(summary_path), env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(summary_path.read_text())

    reference = timm.create_model(tag.split(".")[0], num_classes=3, pretrained=True,
                                  pretrained_cfg_overlay={"file": hf_cache_file(hub_cache, f"timm/{tag}"),
                                                          "num_classes": 3}).eval()
    transform = transforms.val_transform(73, 64, "bicubic")
    val = torchvision.datasets.ImageFolder(os.path.join(image_folder, "val"), transform)
    images, labels = zip(*[val[i] for i in range(len(val))])
    with torch.no_grad():
        logits = reference(torch.stack(images))
    loss = F.cross_entropy(logits, torch.tensor(labels), label_smoothing=0.1).item()
    assert summary["val_loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("source, arch, message", [
    ("timm", "mnasnet0_5", "timm publishes no weights for mnasnet0_5 (mnasnet_050); it has them for mnasnet1_0 "
                           "(mnasnet_100)"),
    ("timm", "mnasnet1_3", "timm publishes no weights for mnasnet1_3 (no timm network is the same)"),
    ("torchvision", "mnasnet_a1", "torchvision publishes no weights for mnasnet_a1; it has them for mnasnet0_5, "
                                  "mnasnet0_75, mnasnet1_0, mnasnet1_3"),
])
def test_archs_without_published_weights(source, arch, message, refused_connections):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        named_weights.resolve(source, arch)
    assert not refused_connections


def test_timm_not_installed(monkeypatch, capsys, tmp_path, image_folder):
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "timm.models", None)
    with pytest.raises(SystemExit):
        main.main([image_folder, *tiny_flags(tmp_path), "-a", "mnasnet1_0", "-e", "--pretrained", "timm"])
    assert capsys.readouterr().err.strip() == "error: --pretrained timm needs timm: pip install timm"


# --- --interpolation and --crop-pct ---

def chosen(*argv, weights=None):
    args = main.parse_args(["x", *argv])
    description = options.choose_val_preprocessing(args, weights)
    return (args.val_resize_size, args.val_crop_size, args.interpolation), description


def test_crop_pct_sets_the_resize_and_flags_win_over_the_weights():
    assert chosen()[0] == (256, 224, "bilinear")
    assert chosen("--crop-pct", "0.875", "--val-crop-size", "160")[0] == (182, 160, "bilinear")  # timm: floor
    assert chosen("--crop-pct", "0.875", "--val-resize-size", "256")[0] == (256, 224, "bilinear")
    torchvision_0_75 = named_weights.resolve("torchvision", "mnasnet0_75")  # resize 232, crop 224
    assert chosen(weights=torchvision_0_75)[0] == (232, 224, "bilinear")
    assert chosen("--interpolation", "bicubic", "--val-crop-size", "112", weights=torchvision_0_75)[0] == (
        116, 112, "bicubic")
    assert chosen("--val-resize-size", "300", weights=torchvision_0_75)[0] == (300, 224, "bilinear")
    assert chosen("--crop-pct", "1", weights=torchvision_0_75)[0] == (224, 224, "bilinear")
    timm_b1 = named_weights.resolve("timm", "mnasnet1_0")
    values, description = chosen(weights=timm_b1)
    assert values == (256, 224, "bicubic")
    assert description == ("validation: resize 256 (crop / 0.875, weights), centre crop 224 (weights), bicubic "
                           f"(weights); weights: timm's {TIMM_TAG}")


@pytest.mark.parametrize("argv, message", [
    (["--crop-pct", "0.875", "--val-resize-size", "250"],
     "--crop-pct 0.875 with --val-crop-size 224 means --val-resize-size 256, but --val-resize-size is 250; "
     "give one of them"),
    (["--crop-pct", "0"], "--crop-pct must be in (0, 1], got 0.0"),
    (["--crop-pct", "1.2"], "--crop-pct must be in (0, 1], got 1.2"),
])
def test_crop_pct_refusals(argv, message):
    """A --crop-pct out of range is refused by the checks, one that contradicts the sizes when they are chosen."""
    args = main.parse_args(["x", *argv])
    with pytest.raises(UserError) as raised:
        main.check_args(args)
        options.choose_val_preprocessing(args, None)
    assert str(raised.value) == message


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """One detailed JPEG (train/ and val/), where bilinear and bicubic resampling give different pixels."""
    root = tmp_path_factory.mktemp("photo")
    pixels = torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for split in ("train", "val"):
        os.makedirs(root / split / "n01")
        Image.fromarray(pixels.numpy()).save(root / split / "n01" / "photo.JPEG", quality=95)
    return root


def _reference(path, interpolation, pil):
    """torchvision's own Resize(56) + CenterCrop(48): on the PIL image, or on torchvision.io's decode; uint8."""
    mode = torchvision.transforms.InterpolationMode(interpolation)
    steps = torchvision.transforms.v2.Compose([torchvision.transforms.v2.Resize(56, interpolation=mode),
                                               torchvision.transforms.v2.CenterCrop(48)])
    if pil:
        with Image.open(path) as image:
            return torchvision.transforms.functional.pil_to_tensor(steps(image.convert("RGB")))
    return steps(torchvision.io.decode_image(str(path)))


@pytest.mark.parametrize("interpolation", transforms.INTERPOLATIONS)
@pytest.mark.parametrize("name", pipeline.PIPELINES)
def test_every_validation_pipeline_resamples_with_interpolation(photo_folder, tmp_path, name, interpolation):
    """Built as main.py builds them (--fast-val: each pipeline's own validation path, not PIL's)."""
    args = main.parse_args([str(photo_folder), "--pipeline", name, "--fast-val", "--interpolation", interpolation,
                            "--val-resize-size", "56", "--val-crop-size", "48", "-j", "0", "-b", "1",
                            "--device", "cpu", "--output-dir", str(tmp_path)])
    main.check_args(args)
    main.prepare(args)
    _, val_set = main.build_datasets(args, resume_path="")
    _, val_loader, _ = main.build_loaders(None, val_set, cpu_runtime(), args, log=None)
    images, _ = next(iter(val_loader))
    mean = torch.tensor(transforms.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(transforms.IMAGENET_STD)[:, None, None]
    pixels = (images[0].float() * std + mean) * 255

    path = photo_folder / "val" / "n01" / "photo.JPEG"
    pil = name == "standard"
    other = "bicubic" if interpolation == "bilinear" else "bilinear"
    expected, unexpected = _reference(path, interpolation, pil).float(), _reference(path, other, pil).float()
    assert (expected - unexpected).abs().mean() > 2  # the two resamplings differ on this image
    assert (pixels - expected).abs().max() < 1.01  # uint8 rounding, the normalisation's float error


def test_classify_validates_as_the_checkpoint_was():
    recorded = {"args": {"val_resize_size": 73, "val_crop_size": 64, "interpolation": "bicubic"}}
    assert classify.eval_sizes(recorded) == (73, 64, "bicubic")
    assert classify.eval_sizes({"args": {"val_resize_size": 73}}) == (73, 224, "bilinear")  # older checkpoints
    assert classify.eval_sizes({}) == (256, 224, "bilinear")  # torchvision's files
