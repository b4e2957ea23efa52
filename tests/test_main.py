"""End-to-end runs of main.py on the CPU: training that learns, checkpoints, resume, evaluate, distributed."""
import csv
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

import main
from helpers import (expect_error, randomize, run_main_in_process, run_main_subprocess, tiny_flags, weights,
                     write_image_folder)
from training import demo, engine, recipe, transforms
from training.utils import state_digest


def test_training_learns(trained):
    output_dir, summary = trained
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(8))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert summary["best_acc1"] > 100 / 3 + 30  # three classes: chance is 33%
    assert summary["val_images"] == 15
    # 36 images in batches of 8: 4 steps an epoch, the first of each (--fps-warmup-steps 1) left out of the FPS.
    assert summary["train_steps"] == 8 * 4
    assert summary["measured_steps"] == 8 * 3 and summary["measured_images"] == 8 * 3 * 8
    # The measured window lies inside the epochs' training time, which lies inside the run.
    rows = metrics_rows(output_dir)
    assert 0 < summary["measured_seconds"] < sum(float(row["epoch_seconds"]) for row in rows) < summary["e2e_seconds"]
    assert summary["fps"] == pytest.approx(8 * 3 * 8 / summary["measured_seconds"])
    log = (output_dir / "train.log").read_text()
    assert "Epoch: [7][4/4]\tTime " in log and "FPS " in log
    assert f" * Acc@1 {summary['val_acc1']:.3f} Acc@5 " in log


def metrics_rows(output_dir):
    with open(output_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_warmup_and_cosine_set_each_epochs_learning_rate(trained):
    """--lr 0.01 --warmup 1 --epochs 8, 4 steps an epoch: epoch 0 starts at 0.1x the LR, epoch 1 (the end of the
    warm-up) at the full LR, then the cosine over the remaining 28 steps."""
    output_dir, _ = trained
    lrs = [float(row["lr"]) for row in metrics_rows(output_dir)]
    expected = [0.001] + [0.01 * 0.5 * (1 + math.cos(math.pi * 4 * (epoch - 1) / 28)) for epoch in range(1, 8)]
    assert lrs == pytest.approx(expected, rel=1e-5)


def test_nesterov_and_weight_decay_groups_reach_the_saved_optimizer(trained):
    """The run had --nesterov --wd 1e-5: SGD's groups say so, and only the conv and linear weights decay."""
    output_dir, _ = trained
    state = torch.load(output_dir / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert all(group["nesterov"] and group["momentum"] == 0.9 for group in groups)
    assert [group["weight_decay"] for group in groups] == [1e-5, 0.0]
    shapes = [tensor.shape for name, tensor in state["state_dict"].items() if not name.endswith(
        ("running_mean", "running_var", "num_batches_tracked"))]
    assert [len(group["params"]) for group in groups] == [sum(len(s) > 1 for s in shapes),
                                                         sum(len(s) == 1 for s in shapes)]


def test_checkpoints_are_plain_and_unprefixed(trained):
    output_dir, summary = trained
    state = torch.load(output_dir / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert {"epoch", "arch", "state_dict", "best_acc1", "optimizer", "scheduler", "args"} <= set(state)
    assert state["epoch"] == 8 and state["arch"] == "mnasnet0_5"
    assert state["best_acc1"] == pytest.approx(summary["best_acc1"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["state_dict"])
    assert isinstance(state["args"], dict) and state["args"]["epochs"] == 8
    best = torch.load(output_dir / "model_best.pth.tar", map_location="cpu", weights_only=True)
    assert best["best_acc1"] == pytest.approx(summary["best_acc1"])
    reference = torchvision.models.mnasnet0_5(num_classes=3)
    reference.load_state_dict(state["state_dict"])  # our checkpoints load into torchvision's model


def test_evaluate_reproduces_best_accuracy(trained, image_folder, tmp_path):
    output_dir, summary = trained
    result = run_main_in_process(image_folder, *tiny_flags(tmp_path, "--evaluate", "--resume",
                                                           str(output_dir / "model_best.pth.tar")))
    assert result["val_acc1"] == pytest.approx(summary["best_acc1"])
    assert result["val_images"] == 15


def test_seed_makes_a_cpu_run_repeatable(image_folder, tmp_path):
    for name in ("a", "b"):
        run_main_in_process(image_folder, *tiny_flags(tmp_path / name, "--epochs", "1", "--seed", "3", "-j", "1",
                                                      "--no-val"))
    a, b = weights(tmp_path / "a" / "checkpoint.pth.tar"), weights(tmp_path / "b" / "checkpoint.pth.tar")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrained_torchvision_weights_with_module_prefix(image_folder, tmp_path):
    # Off their init: an initialised network's logits are ~1e-7, and any such network would score ln(3).
    reference = randomize(torchvision.models.mnasnet0_5(num_classes=3))
    path = tmp_path / "tv.pth"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    result = run_main_in_process(image_folder, *tiny_flags(tmp_path, "--evaluate", "--pretrained", str(path)))
    assert result["val_images"] == 15
    # The weights main.py scored are the file's: its loss and Acc@1 are the reference model's on the same images,
    # preprocessed as tiny_flags asks (resize 52, centre crop 48), with the default --label-smoothing 0.1; to
    # the rounding of the BatchNorm folding that validation runs.
    val_set = torchvision.datasets.ImageFolder(os.path.join(image_folder, "val"), transforms.val_transform(52, 48))
    images, labels = torch.stack([image for image, _ in val_set]), torch.tensor(val_set.targets)
    with torch.no_grad():
        logits = reference.eval()(images)
    assert result["val_loss"] == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-4)
    assert result["val_acc1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())


def test_two_gloo_processes_train_and_count_each_val_image_once(image_folder, tmp_path):
    out = tmp_path / "ddp"
    summary_path = tmp_path / "ddp.json"
    proc = run_main_subprocess(image_folder, *tiny_flags(out, "--epochs", "2", "--seed", "0",
                                                         "--multiprocessing-distributed", "--device-list", "0,1",
                                                         "--summary-json", str(summary_path)))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == 2
    assert summary["val_images"] == 15  # 15 images over 2 ranks: no padding, no drop
    log = (out / "train.log").read_text()
    assert "Epoch: [1]" in log
    assert (out / "rank1.log").exists()
    # A single process scoring the saved weights gets what the two ranks did together: the same accuracy and, to
    # float rounding (1e-7 measured), the same loss; with each rank's own BatchNorm statistics, rank 1's half
    # would score other weights.
    single = run_main_in_process(image_folder, *tiny_flags(tmp_path / "single", "--evaluate", "--resume",
                                                           str(out / "checkpoint.pth.tar")))
    assert single["val_acc1"] == pytest.approx(summary["val_acc1"])
    assert single["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert single["val_images"] == 15
    # Both ranks ended with the weights that were saved.
    saved = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    digest = state_digest(saved["state_dict"])
    assert summary["weights_sha256"] == digest
    assert f"=> rank 1 weights sha256 {digest}" in (out / "rank1.log").read_text()


def test_missing_data_folder(tmp_path, capsys):
    expect_error(capsys, [str(tmp_path / "nowhere"), *tiny_flags(tmp_path)], "nowhere")


def test_data_folder_without_train(tmp_path, capsys):
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    expect_error(capsys, [str(tmp_path / "data"), *tiny_flags(tmp_path / "out")], "train")


def test_val_class_missing_from_train(image_folder, tmp_path, capsys):
    data_dir = write_image_folder(tmp_path / "data", 2, 1)
    os.rename(os.path.join(data_dir, "val", "n03_blue"), os.path.join(data_dir, "val", "n04_purple"))
    expect_error(capsys, [data_dir, *tiny_flags(tmp_path / "out")], "n04_purple")


def test_unknown_arch(image_folder, tmp_path, capsys):
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), "-a", "resnet18"], "resnet18")


def test_checkpoint_of_another_arch_or_class_count(trained, image_folder, tmp_path, capsys):
    output_dir, _ = trained
    ckpt = str(output_dir / "checkpoint.pth.tar")
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), "-a", "mnasnet0_75", "--evaluate", "--resume", ckpt],
                 "mnasnet0_5", "mnasnet0_75")
    other = torchvision.models.mnasnet0_5(num_classes=7)
    path = tmp_path / "seven.pth"
    torch.save(other.state_dict(), path)
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), "--evaluate", "--pretrained", str(path)],
                 "7 classes", "3")


def test_missing_resume_file_is_an_error(image_folder, tmp_path, capsys):
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path), "--resume", str(tmp_path / "none.pth.tar")],
                 "none.pth.tar")


@pytest.mark.parametrize("device_name", ["npu", "cuda"])
def test_absent_device(image_folder, tmp_path, capsys, device_name):
    if device_name == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = [image_folder, *tiny_flags(tmp_path)]
    argv[argv.index("cpu")] = device_name
    expect_error(capsys, argv, f"--device {device_name}")


def test_errors_from_a_fresh_process_are_one_line(tmp_path):
    proc = run_main_subprocess(str(tmp_path / "missing"), "--device", "cpu", "--output-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


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


def test_demo_defaults_apply_only_without_data():
    demo_args = main.parse_args([])
    assert all(getattr(demo_args, key) == value for key, value in demo.DEMO_DEFAULTS.items())
    explicit = main.parse_args(["--epochs", "2", "-a", "mnasnet1_3"])
    assert (explicit.epochs, explicit.arch, explicit.lr) == (2, "mnasnet1_3", demo.DEMO_DEFAULTS["lr"])
    for argv in (["/data/imagenet"], ["--dummy"]):
        args = main.parse_args(argv)
        assert (args.arch, args.epochs, args.lr, args.train_crop_size) == ("mnasnet1_0", 90, 0.1, 224)


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

    model = torchvision.models.mnasnet0_5(num_classes=3)
    model.load_state_dict(weights(weights_path))
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        first = engine.inference_model(model, fuse_bn=False, compile_backend="inductor")(x)
        for parameter in model.parameters():
            parameter.mul_(1.5)
        second = engine.inference_model(model, fuse_bn=False, compile_backend="inductor")(x)
        torch.testing.assert_close(second, model.eval()(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(first, second, atol=1e-2)


def test_sgd_is_fused_on_cuda_unless_apex_wraps_it():
    args = main.parse_args(["--dummy"])
    params = [torch.nn.Parameter(torch.ones(2))]
    assert recipe.build_optimizer("cuda", params, args).param_groups[0]["fused"]
    assert not recipe.build_optimizer("cpu", params, args).param_groups[0]["fused"]
    args.amp, args.amp_backend = True, "apex"
    assert not recipe.build_optimizer("cuda", params, args).param_groups[0]["fused"]


def test_a_cuda_checkpoint_resumes_with_this_devices_optimizer_kernels(trained, image_folder, tmp_path, monkeypatch):
    """The saved optimizer state says fused=True on CUDA; resumed elsewhere, the steps run this device's kernels."""
    output_dir, _ = trained
    state = torch.load(output_dir / "checkpoint.pth.tar", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True
    torch.save(state, tmp_path / "cuda.pth.tar")
    fused_steps = []
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        fused_steps.append(self.param_groups[0]["fused"])
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    run_main_in_process(image_folder, *tiny_flags(tmp_path / "run", "--resume", str(tmp_path / "cuda.pth.tar"),
                                                  "--epochs", str(state["epoch"] + 1), "--no-val", "--no-checkpoint"))
    assert fused_steps and not any(fused_steps)
