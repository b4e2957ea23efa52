"""The recipe's pieces, and that main.py wires each into the run: the warm-up and its junction with the decay,
which parameters decay, label smoothing and Nesterov reaching the criterion and optimizer main.py builds, the
global batch split across processes, and --sync-bn."""
import math

import pytest
import torch
from torch import nn

import main
import mnasnet
from helpers import expect_error, run_main_in_process, tiny_flags
from training import distributed, recipe


def step_lrs(steps, warmup_epochs, epochs, kind="cosine", steps_per_epoch=10):
    """The learning rate (base 1.0) of each of the first ``steps`` steps."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = recipe.lr_schedule(optimizer, steps_per_epoch, warmup_epochs, epochs, kind)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_rises_from_a_tenth_and_meets_the_cosine():
    lrs = step_lrs(100, warmup_epochs=2, epochs=10)  # 20 warm-up steps of 100
    warmup = [0.1 + 0.9 * step / 20 for step in range(20)]
    # The cosine starts at the full rate where the warm-up ends and runs over the remaining 80 steps.
    cosine = [0.5 * (1 + math.cos(math.pi * (step - 20) / 80)) for step in range(20, 100)]
    assert lrs == pytest.approx(warmup + cosine)
    assert lrs[0] == pytest.approx(0.1) and lrs[20] == pytest.approx(1.0)
    assert max(abs(b - a) for a, b in zip(lrs, lrs[1:])) <= 0.9 / 20 + 1e-9  # no jump at the junction


@pytest.mark.parametrize("kind, after_warmup", [("step", 1.0), ("exponential", 0.97)])
def test_warmup_hands_over_to_the_staircases(kind, after_warmup):
    # 5 warm-up steps (0.5 epochs); the staircases count from the first step: 0.97 every 24 steps (2.4 epochs).
    lrs = step_lrs(30, warmup_epochs=0.5, epochs=10, kind=kind)
    assert lrs[:5] == pytest.approx([0.1 + 0.9 * step / 5 for step in range(5)])
    assert lrs[5] == pytest.approx(1.0) and lrs[24] == pytest.approx(after_warmup)


def test_weight_decay_applies_to_conv_and_linear_weights_only():
    model = mnasnet.mnasnet0_5(num_classes=3)
    model.classifier[1].bias.requires_grad_(False)  # a frozen parameter is in neither group
    names = {id(param): name for name, param in model.named_parameters()}
    weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}
    norms_and_biases = {name for name in names.values() if name not in weights} - {"classifier.1.bias"}
    assert any(".1.weight" in name for name in norms_and_biases)  # BatchNorm parameters among them

    decay, no_decay = recipe.parameter_groups(model, 1e-4)
    assert {names[id(p)] for p in decay["params"]} == weights and decay["weight_decay"] == 1e-4
    assert {names[id(p)] for p in no_decay["params"]} == norms_and_biases and no_decay["weight_decay"] == 0.0

    decay, no_decay = recipe.parameter_groups(model, 1e-4, decay_norm_and_bias=True)
    assert {names[id(p)] for p in decay["params"]} == weights | norms_and_biases and not no_decay["params"]


def test_a_step_shrinks_the_decayed_weights_only():
    """With zero gradients, SGD's step is the decay alone: conv weights shrink; the conv's bias and BatchNorm's
    scale and shift stay."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    nn.init.normal_(model[1].weight)
    nn.init.normal_(model[1].bias)
    before = [param.detach().clone() for param in model.parameters()]
    optimizer = torch.optim.SGD(recipe.parameter_groups(model, 0.1), lr=1.0)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    conv_weight, *unchanged = model.parameters()
    torch.testing.assert_close(conv_weight.detach(), 0.9 * before[0])
    assert all(torch.equal(param.detach(), old) for param, old in zip(unchanged, before[1:]))


@pytest.fixture
def built(monkeypatch):
    """The criterion and optimizer main.py builds, with how often each was used in training steps."""
    made = {"criteria": [], "optimizers": []}

    class RecordedLoss(nn.CrossEntropyLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.training_calls = 0
            made["criteria"].append(self)

        def forward(self, output, target):
            self.training_calls += int(torch.is_grad_enabled())
            return super().forward(output, target)

    build_optimizer = recipe.build_optimizer

    def recorded_optimizer(kind, params, args):
        optimizer = build_optimizer(kind, params, args)
        made["optimizers"].append(optimizer)
        return optimizer

    monkeypatch.setattr(nn, "CrossEntropyLoss", RecordedLoss)
    monkeypatch.setattr(recipe, "build_optimizer", recorded_optimizer)
    return made


def one_dimensional_parameters():
    """mnasnet0_5's BatchNorm weights and biases and the classifier's bias."""
    return sum(param.ndim == 1 for param in mnasnet.mnasnet0_5(num_classes=3).parameters())


@pytest.mark.parametrize("flags, smoothing, optimizer_class, nesterov, decayed_1d", [
    ([], 0.1, torch.optim.SGD, False, False),
    (["--label-smoothing", "0.25", "--nesterov", "--wd", "0.003"], 0.25, torch.optim.SGD, True, False),
    (["--label-smoothing", "0", "--decay-norm-and-bias", "--wd", "0.003"], 0.0, torch.optim.SGD, False, True),
    (["--opt", "rmsprop", "--wd", "0.003"], 0.1, recipe.RMSpropTF, None, False),
])
def test_recipe_flags_reach_the_criterion_and_optimizer_main_trains_with(image_folder, tmp_path, built, flags,
                                                                         smoothing, optimizer_class, nesterov,
                                                                         decayed_1d):
    run_main_in_process(image_folder, *tiny_flags(tmp_path, "--epochs", "1", "--max-steps", "2", "--no-val",
                                                  "--no-checkpoint", *flags))
    (criterion,), (optimizer,) = built["criteria"], built["optimizers"]
    assert criterion.label_smoothing == smoothing and criterion.training_calls == 2
    assert type(optimizer) is optimizer_class
    if nesterov is not None:
        assert all(group["nesterov"] is nesterov and group["momentum"] == 0.9 for group in optimizer.param_groups)
    decay, no_decay = optimizer.param_groups
    weight_decay = 0.003 if flags else 1e-5  # tiny_flags' --wd
    assert decay["weight_decay"] == weight_decay and no_decay["weight_decay"] == 0.0
    assert sum(param.ndim == 1 for param in decay["params"]) == (one_dimensional_parameters() if decayed_1d else 0)
    assert len(no_decay["params"]) == (0 if decayed_1d else one_dimensional_parameters())
    assert optimizer.state and all(optimizer.state.values())  # the steps ran through this optimizer


def as_rank_0_of(world_size):
    """distributed.setup_runtime's answer for rank 0 of ``world_size`` CPU processes, without joining a process group:
    what main.py checks and builds before its first collective."""
    return lambda args, local_rank: distributed.Runtime("cpu", torch.device("cpu"), rank=0, world_size=world_size,
                                                   memory_format=torch.channels_last)


def test_a_global_batch_that_does_not_split_across_the_processes_is_an_error(image_folder, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setattr(distributed, "setup_runtime", as_rank_0_of(2))
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "-b", "9")],
                 "-b/--batch-size 9 is the global batch and must divide evenly across 2 processes")


class ModelBuilt(Exception):
    """Stops main.py once the model it will train is built."""


@pytest.mark.parametrize("world_size", [1, 2])
def test_sync_bn_converts_every_batchnorm_when_distributed(image_folder, tmp_path, monkeypatch, world_size):
    """SyncBatchNorm cannot train on the CPU (prepare refuses --sync-bn there), so the run is stopped when the
    model reaches the optimizer: with several processes every BatchNorm is a SyncBatchNorm, keeping its momentum
    and the checkpoint keys; one process keeps plain BatchNorm."""
    models = []

    def stop_at_parameter_groups(model, *args):
        models.append(model)
        raise ModelBuilt
    monkeypatch.setattr(distributed, "setup_runtime", as_rank_0_of(world_size))
    monkeypatch.setattr(recipe, "parameter_groups", stop_at_parameter_groups)
    args = main.parse_args([image_folder, *tiny_flags(tmp_path)])
    main.check_args(args)
    main.prepare(args)
    args.sync_bn = True
    with pytest.raises(ModelBuilt):
        main.main_worker(0, args)
    (model,) = models
    plain = mnasnet.mnasnet0_5(num_classes=3)
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == sum(isinstance(module, nn.BatchNorm2d) for module in plain.modules())
    assert all(type(norm) is (nn.SyncBatchNorm if world_size > 1 else nn.BatchNorm2d) for norm in norms)
    assert all(norm.momentum == 0.3 for norm in norms)  # tiny_flags' --bn-momentum, set before the conversion
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_sync_bn_on_the_cpu_is_refused(image_folder, tmp_path, capsys):
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "--sync-bn")],
                 "--sync-bn needs NPUs or CUDA GPUs")
