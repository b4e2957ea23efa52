"""main.py --evaluate: it scores what training scored, in bf16, with BatchNorm folded, compiled, and from a
checkpoint alone."""
import os
import shutil

import pytest
import torch
import torchvision

from helpers import expect_error, run_main_in_process, tiny_flags, weights
from training import engine


def test_evaluate_reproduces_best_accuracy(trained, image_folder, tmp_path):
    output_dir, summary = trained
    result = run_main_in_process(image_folder, *tiny_flags(tmp_path, "--evaluate", "--resume",
                                                           str(output_dir / "model_best.pth.tar")))
    assert result["val_acc1"] == pytest.approx(summary["best_acc1"])
    assert result["val_images"] == 15


def test_bf16_evaluation_scores_like_fp32(trained, image_folder, tmp_path):
    """--amp on the CPU evaluates in bf16 (where the CPU has it): the trained model's Acc@1 does not move."""
    output_dir, _ = trained
    scores = {}
    for name, extra in (("fp32", []), ("amp", ["--amp"])):
        scores[name] = run_main_in_process(image_folder, *tiny_flags(tmp_path / name, "-e", "--pretrained",
                                                                        str(output_dir / "checkpoint.pth.tar"), *extra))
    assert scores["amp"]["val_acc1"] == scores["fp32"]["val_acc1"]
    # bf16 keeps 8 bits of mantissa: through ~50 layers the loss moves by a few percent, the ranking does not.
    assert scores["amp"]["val_loss"] == pytest.approx(scores["fp32"]["val_loss"], rel=0.05)


def test_bn_folded_validation_scores_like_the_trained_model(trained, image_folder, tmp_path):
    """Validation runs a copy with BatchNorm folded into the convolutions: same outputs, same scores."""
    output_dir, _ = trained
    weights_path = str(output_dir / "checkpoint.pth.tar")
    scores = {flag: run_main_in_process(image_folder, *tiny_flags(tmp_path / flag, "-e", "--pretrained", weights_path,
                                                                  flag))
              for flag in ("--fuse-bn", "--no-fuse-bn")}
    assert scores["--fuse-bn"]["val_acc1"] == scores["--no-fuse-bn"]["val_acc1"]
    assert scores["--fuse-bn"]["val_loss"] == pytest.approx(scores["--no-fuse-bn"]["val_loss"], rel=1e-4)

    model = torchvision.models.mnasnet0_5(num_classes=3)
    model.load_state_dict(weights(weights_path))
    model.train()
    folded = engine.inference_model(model, fuse_bn=True)
    assert model.training  # the trained model is left as it was
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-4)


def test_compiled_validation_scores_like_eager_and_sees_new_weights(trained, image_folder, tmp_path):
    """-e --compile evaluates a copy compiled with inductor's freezing (weights baked in as constants): the same
    scores as eager; and a later compile takes the weights of its own time, not the first ones."""
    output_dir, _ = trained
    weights_path = str(output_dir / "checkpoint.pth.tar")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    scores = {name: run_main_in_process(image_folder, *tiny_flags(tmp_path / name, "-e", "--pretrained", weights_path,
                                                                  "--amp", *extra))
              for name, extra in (("eager", []), ("compiled", ["--compile"]))}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    assert scores["compiled"]["val_acc1"] == scores["eager"]["val_acc1"]
    assert scores["compiled"]["val_loss"] == pytest.approx(scores["eager"]["val_loss"], rel=1e-2)

    # What a later compile sees does not depend on the network: a small one compiles in a fraction of the time.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        first = engine.inference_model(model, fuse_bn=False, compile_backend="inductor")(x)
        for parameter in model.parameters():
            parameter.mul_(1.5)
        second = engine.inference_model(model, fuse_bn=False, compile_backend="inductor")(x)
        torch.testing.assert_close(second, model.eval()(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(first, second, atol=1e-2)


@pytest.fixture(scope="module")
def one_epoch(image_folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one_epoch")
    summary = run_main_in_process(image_folder, *tiny_flags(output_dir, "--epochs", "1", "--seed", "0"))
    return output_dir / "checkpoint.pth.tar", summary


def test_evaluate_needs_only_val_and_the_checkpoints_classes(image_folder, one_epoch, tmp_path):
    path, trained = one_epoch
    val_only = tmp_path / "val_only"
    shutil.copytree(os.path.join(image_folder, "val"), val_only / "val")
    # Class n01_red's folder missing too: labels still follow the checkpoint's class list.
    shutil.rmtree(val_only / "val" / "n01_red")
    full = run_main_in_process(image_folder, *tiny_flags(tmp_path / "full", "-e", "--resume", str(path)))
    assert full["val_acc1"] == pytest.approx(trained["val_acc1"])
    # -b 64: more than the 36 training images (evaluation needs no training batch).
    alone = run_main_in_process(str(val_only), *tiny_flags(tmp_path / "alone", "-e", "--resume", str(path), "-b", "64"))
    assert alone["val_images"] == 10


def test_evaluate_without_train_or_recorded_classes_is_one_line(image_folder, one_epoch, tmp_path, capsys):
    path, _ = one_epoch
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(path, weights_only=True)["state_dict"], bare)  # weights only: no class list
    shutil.copytree(os.path.join(image_folder, "val"), tmp_path / "val_only" / "val")
    expect_error(capsys, [str(tmp_path / "val_only"), *tiny_flags(tmp_path, "-e", "--pretrained", str(bare))],
                 "no train/", "classes")


def test_resuming_a_finished_run_is_one_line(image_folder, one_epoch, tmp_path, capsys):
    """A checkpoint of a run that trained all its --epochs: nothing is left to train, which must not pass for a
    successful run."""
    path, _ = one_epoch
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "--epochs", "1", "--resume", str(path))],
                 "has finished its 1 epochs", "--epochs")
