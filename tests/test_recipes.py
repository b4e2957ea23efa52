"""Recipes beyond the reference: TF-style RMSProp, LR decays, weights EMA, augmentations, MixUp/CutMix."""
import csv
import math

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import v2

from helpers import run_main_in_process, tiny_flags
from training import checkpoint, data, recipe, transforms


def test_rmsprop_tf_follows_tensorflow_formula():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5))
    optimizer = recipe.RMSpropTF([weight], lr=0.1, decay=0.9, momentum=0.9, eps=1e-3, weight_decay=0.01)
    w, ms, mom = weight.detach().clone(), torch.ones(5), torch.zeros(5)
    for lr in (0.1, 0.1, 0.05):  # a changed LR scales only the new step, not the momentum already built up
        optimizer.param_groups[0]["lr"] = lr
        grad = torch.randn(5)
        weight.grad = grad.clone()
        optimizer.step()
        g = grad + 0.01 * w
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.9 * mom + lr * g / torch.sqrt(ms + 1e-3)
        w = w - mom
        torch.testing.assert_close(weight.detach(), w)

    torch_weight = torch.nn.Parameter(weight.detach().clone())
    torch_weight.grad = torch.ones(5)
    torch.optim.RMSprop([torch_weight], lr=0.1, alpha=0.9, momentum=0.9, eps=1e-3).step()
    weight.grad = torch.ones(5)
    before = weight.detach().clone()
    optimizer.step()
    assert not torch.allclose(torch_weight - before, weight - before)  # torch's RMSprop is another optimizer


def factors(kind, steps, **options):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = recipe.lr_schedule(optimizer, 10, 0, 100, kind, **options)
    values = []
    for _ in range(max(steps) + 1):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return [values[s] for s in steps]


def test_exponential_decay_is_the_papers_staircase():
    # 10 steps per epoch: 0.97 every 2.4 epochs = every 24 steps
    assert factors("exponential", [0, 23, 24, 47, 48, 240]) == pytest.approx(
        [1, 1, 0.97, 0.97, 0.97 ** 2, 0.97 ** 10])
    assert factors("step", [0, 299, 300, 600]) == pytest.approx([1, 1, 0.1, 0.01])
    assert factors("step", [0, 49, 50], decay_epochs=5, decay_rate=0.5) == pytest.approx([1, 1, 0.5])
    assert factors("cosine", [0, 500, 999]) == pytest.approx([1, 0.5, 0.5 * (1 + math.cos(math.pi * 999 / 1000))])


def test_ema_averages_weights_and_batchnorm_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = recipe.model_ema(model, decay_per_step=0.5, every_steps=2)  # 0.25 per update
    ema.update_parameters(model)  # the first update copies
    before_weight, before_mean = model[0].weight.detach().clone(), model[1].running_mean.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(8, 2) + 3)  # moves the BatchNorm running mean
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module[0].weight, 0.25 * before_weight + 0.75 * model[0].weight)
    torch.testing.assert_close(ema.module[1].running_mean, 0.25 * before_mean + 0.75 * model[1].running_mean)


def test_model_ema_is_validated_checkpointed_resumed_and_can_be_best(image_folder, tmp_path):
    flags = ("--seed", "0", "--model-ema", "--model-ema-steps", "1", "--model-ema-decay", "0.7")
    run_main_in_process(image_folder, *tiny_flags(tmp_path, "--epochs", "2", *flags))
    summary = run_main_in_process(image_folder, *tiny_flags(tmp_path, "--epochs", "3", *flags, "--resume",
                                                            str(tmp_path / checkpoint.CHECKPOINT_NAME)))
    assert "ema_val_acc1" in summary
    saved = torch.load(tmp_path / checkpoint.CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert int(saved["model_ema"]["n_averaged"]) == 3 * 4  # every step of all 3 epochs: the resume kept it
    assert " * EMA Acc@1 " in (tmp_path / "train.log").read_text()
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and all(row["ema_val_acc1"] for row in rows)
    best_score = max(float(row[key]) for row in rows for key in ("val_acc1", "ema_val_acc1"))
    best = torch.load(tmp_path / checkpoint.BEST_NAME, map_location="cpu", weights_only=True)
    assert best["best_acc1"] == pytest.approx(best_score, abs=1e-3)
    # Whichever scored best, model_best.pth.tar's state_dict holds those weights.
    result = run_main_in_process(image_folder, *tiny_flags(tmp_path / "eval", "--evaluate", "--resume",
                                                           str(tmp_path / checkpoint.BEST_NAME)))
    assert result["val_acc1"] == pytest.approx(best["best_acc1"])


def test_augmentations_keep_shape():
    image = Image.new("RGB", (50, 40), (120, 30, 200))
    for auto_augment in transforms.AUTO_AUGMENT:
        out = transforms.train_transform(32, auto_augment=auto_augment, random_erase=1.0)(image)
        assert out.shape == (3, 32, 32) and (out == 0).any()  # erased patch filled with 0


def test_batch_mix_gives_soft_targets():
    assert transforms.batch_mix(3) is None
    mix = transforms.batch_mix(3, mixup_alpha=0.2, cutmix_alpha=1.0)
    images, target = mix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0], dtype=torch.int32))
    assert images.shape == (4, 3, 8, 8) and target.shape == (4, 3)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(4))


def test_paper_recipe_flags_train(image_folder, tmp_path, monkeypatch):
    """Each of the paper recipe's seven flags acts on the run: on the optimizer, the learning rate, the training
    images and the targets the loss is given."""
    datasets, mixes, targets = [], [], []
    image_folders, batch_mix, forward = data.image_folders, transforms.batch_mix, torch.nn.CrossEntropyLoss.forward

    def record_datasets(*args, **kwargs):
        datasets.extend(image_folders(*args, **kwargs))
        return tuple(datasets)

    def record_mix(num_classes, mixup_alpha=0.0, cutmix_alpha=0.0):
        mixes.append((mixup_alpha, cutmix_alpha))
        return batch_mix(num_classes, mixup_alpha, cutmix_alpha)

    def record_target(self, output, target):
        if torch.is_grad_enabled():  # training; validation scores the plain labels
            targets.append(target)
        return forward(self, output, target)
    monkeypatch.setattr(data, "image_folders", record_datasets)
    monkeypatch.setattr(transforms, "batch_mix", record_mix)
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", record_target)
    # A stair of the exponential decay every half epoch (one step here), so that two steps climb down two.
    summary = run_main_in_process(image_folder, *tiny_flags(
        tmp_path, "--epochs", "1", "--max-steps", "2", "--seed", "0", "--opt", "rmsprop",
        "--lr-scheduler", "exponential", "--lr-decay-epochs", "0.5", "--pipeline", "standard", "--auto-augment", "ra",
        "--random-erase", "0.2", "--mixup", "0.2", "--cutmix", "1.0"))
    assert math.isfinite(summary["train_loss"]) and 0 <= summary["train_acc1"] <= 100

    saved = torch.load(tmp_path / checkpoint.CHECKPOINT_NAME, map_location="cpu", weights_only=True)["optimizer"]
    # TensorFlow's RMSProp (recipe.RMSpropTF, which has a decay where torch's has an alpha): its mean square starts
    # at 1, so two steps at decay 0.9 leave every entry at 0.81 or more, to float rounding (torch's starts at 0).
    assert all("decay" in group and "alpha" not in group for group in saved["param_groups"])
    assert all(state["square_avg"].min() > 0.8 for state in saved["state"].values())
    # --lr 0.01 down two stairs of 0.97; the default cosine would be at 0 by the run's last step.
    assert [group["lr"] for group in saved["param_groups"]] == pytest.approx([0.01 * 0.97 ** 2] * 2)

    # The standard pipeline's torchvision transforms on PIL images, with RandAugment and RandomErasing after them.
    train_transform = datasets[0].transform
    assert isinstance(train_transform, T.Compose) and isinstance(train_transform.transforms[1], T.RandomResizedCrop)
    steps = train_transform.transforms
    assert any(isinstance(step, v2.RandAugment) for step in steps)
    assert [step.p for step in steps if isinstance(step, v2.RandomErasing)] == [0.2]

    # The loss was given MixUp/CutMix's soft targets: rows of class probabilities, some split between classes.
    assert mixes == [(0.2, 1.0)]
    assert len(targets) == 2 and all(target.shape == (8, 3) for target in targets)
    for target in targets:
        torch.testing.assert_close(target.sum(dim=1), torch.ones(8))
    assert any(((0 < target) & (target < 1)).any() for target in targets)


@pytest.mark.parametrize("scores, best_is_ema", [
    ({"": [40.0], "EMA": [60.0]}, True),               # one epoch: the EMA scored higher
    ({"": [40.0, 70.0], "EMA": [60.0, 55.0]}, False),  # the weights' 70 at epoch 1 beats it
])
def test_best_checkpoint_holds_the_better_of_weights_and_ema(image_folder, tmp_path, monkeypatch, scores,
                                                             best_is_ema):
    from training import engine
    evaluate = engine.evaluate

    def scripted(model, *args, name=""):
        result = evaluate(model, *args, name=name)
        return {**result, "acc1": scores[name].pop(0)}

    monkeypatch.setattr(engine, "evaluate", scripted)
    flags = ("--seed", "0", "--model-ema", "--model-ema-steps", "1", "--max-steps", "2")
    summary = run_main_in_process(image_folder, *tiny_flags(tmp_path, "--epochs", str(2 if not best_is_ema else 1),
                                                            *flags))
    best = torch.load(tmp_path / checkpoint.BEST_NAME, map_location="cpu", weights_only=True)
    last = torch.load(tmp_path / checkpoint.CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert best["best_acc1"] == summary["best_acc1"] == (60.0 if best_is_ema else 70.0)
    expected = ({k.removeprefix("module."): v for k, v in last["model_ema"].items() if k != "n_averaged"}
                if best_is_ema else last["state_dict"])
    assert best.get("weights") == ("ema" if best_is_ema else None)
    assert best["state_dict"].keys() == expected.keys()
    assert all(torch.equal(best["state_dict"][k], expected[k]) for k in expected)
