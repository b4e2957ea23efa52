"""export_onnx.py (checked with onnxruntime) and the classify.py demo."""
import os

import onnx
import pytest
import torch
import torchvision

import classify
import export_onnx
from helpers import CLASS_COLOURS, onnx_matches_torch, run_main_in_process, tiny_flags
from training import checkpoint

SIZE = 64


@pytest.fixture(scope="module")
def our_checkpoint(image_folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("short")
    run_main_in_process(image_folder, *tiny_flags(output_dir, "--epochs", "1", "--max-steps", "2", "--seed", "0"))
    return output_dir / checkpoint.CHECKPOINT_NAME


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """torchvision's 1000-class mnasnet0_5 state dict, saved with DDP's module. prefix."""
    torch.manual_seed(0)
    reference = torchvision.models.mnasnet0_5()
    path = tmp_path_factory.mktemp("tv") / "tv.pth"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    return path


def test_export_our_checkpoint(our_checkpoint, tmp_path, capsys):
    out = tmp_path / "ours.onnx"
    export_onnx.main([str(our_checkpoint), "-o", str(out), "--image-size", str(SIZE), "--verify"])
    assert "max abs difference" in capsys.readouterr().out
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    model, _ = checkpoint.load_model(str(our_checkpoint))
    assert model.classifier[1].out_features == len(CLASS_COLOURS)
    onnx_matches_torch(out, model, SIZE)


def test_export_torchvision_state_dict_needs_and_takes_arch(torchvision_file, tmp_path, capsys):
    out = tmp_path / "tv.onnx"
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main([str(torchvision_file), "-o", str(out)])
    assert exit_info.value.code == 2 and "-a/--arch" in capsys.readouterr().err
    export_onnx.main([str(torchvision_file), "-a", "mnasnet0_5", "-o", str(out), "--image-size", str(SIZE)])
    model, _ = checkpoint.load_model(str(torchvision_file), "mnasnet0_5")
    onnx_matches_torch(out, model, SIZE)


def test_checkpoint_keeps_class_folder_names(our_checkpoint):
    saved = torch.load(our_checkpoint, map_location="cpu", weights_only=True)
    assert saved["classes"] == sorted(CLASS_COLOURS)


def test_classify_prints_top_classes_by_folder_name(our_checkpoint, image_folder, capsys):
    images = [os.path.join(image_folder, "val", name, f"{name}_0.JPEG") for name in sorted(CLASS_COLOURS)]
    classify.main([str(our_checkpoint), *images])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(images) * (1 + len(CLASS_COLOURS))  # 3 classes: top-3
    assert lines[0] == images[0]
    rows = [line.split() for line in lines[1:4]]
    assert {name for _, name in rows} == set(CLASS_COLOURS)
    probabilities = [float(p.rstrip("%")) for p, _ in rows]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(100, abs=0.1)


def test_classify_names_imagenet_classes(torchvision_file, image_folder, capsys):
    image = os.path.join(image_folder, "val", "n01_red", "n01_red_0.JPEG")
    classify.main([str(torchvision_file), "-a", "mnasnet0_5", image])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    names = classify.imagenet_names()
    assert len(names) == 1000 and names[0] == "tench"
    assert all(line.split("%", 1)[1].strip() in names for line in lines[1:])


def test_classify_unreadable_image_is_one_line(our_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(SystemExit) as exit_info:
        classify.main([str(our_checkpoint), str(bad)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read image {bad}")
