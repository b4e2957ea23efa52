"""training/recipe.py and its wiring into main.py: warm-up and decays, weight decay groups, TF-style RMSProp,
EMA, fused SGD, the flags that reach the criterion and optimizer, SyncBatchNorm."""
import math

import pytest
import torch
from torch import nn

import main
import mnasnet
from helpers import expect_error, run_main_in_process, tiny_flags
from training import distributed, recipe
from training.precision import NativeAmp


def test_sgd_is_fused_on_cuda_unless_apex_wraps_it():
    args = main.parse_args(["--dummy"])
    params = [torch.nn.Parameter(torch.ones(2))]
    assert recipe.build_optimizer("cuda", params, args).param_groups[0]["fused"]
    assert not recipe.build_optimizer("cpu", params, args).param_groups[0]["fused"]
    args.amp, args.amp_backend = True, "apex"
    assert not recipe.build_optimizer("cuda", params, args).param_groups[0]["fused"]


# --- fused SGD after skipped first steps ---

@pytest.fixture
def uninitialised_is_nan(monkeypatch):
    """torch.empty_like gives NaN instead of whatever the memory held (often zeros, by chance), so that a buffer
    allocated and never written shows in every run. Fused SGD allocates its momentum buffers with it."""
    monkeypatch.setattr(torch, "empty_like", lambda tensor, **options: torch.full_like(tensor, float("nan"), **options))


def _sgd_steps(kind, losses, nesterov, resume_from=None):
    """``recipe.build_optimizer(kind)`` SGD on CPU tensors ("cuda": fused, CPU's fused kernel), stepped through
    NativeAmp with a real GradScaler, which hands the fused step its found_inf and grad_scale. The weights after
    each step."""
    args = main.parse_args(["--dummy", "--momentum", "0.9", "--lr", "0.1", "--wd", "1e-4"])
    args.nesterov = nesterov
    weight = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))
    optimizer = recipe.build_optimizer(kind, [{"params": [weight], "weight_decay": args.weight_decay}], args)
    assert optimizer.param_groups[0]["fused"] == (kind == "cuda")
    if resume_from is not None:
        kernels = {key: optimizer.param_groups[0][key] for key in ("fused", "foreach")}
        optimizer.load_state_dict(resume_from)
        optimizer.param_groups[0].update(kernels)  # as main.resume does: this device's kernels
    precision = NativeAmp("cpu", "dynamic", "float16")
    steps = []
    for factor in losses:
        precision.step((weight * torch.arange(12.).reshape(3, 4) * factor).sum(), optimizer)
        steps.append(weight.detach().clone())
    return steps, optimizer


@pytest.mark.parametrize("skipped", [1, 3])
@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_after_skipped_first_steps_steps_like_unfused_sgd(skipped, nesterov, uninitialised_is_nan):
    """The first applied step equals unfused SGD's to the bit, and the skipped steps leave no trace: the later
    steps equal those of fused SGD that skipped nothing (they differ from unfused SGD's by float rounding, as they
    do without skipped steps: the kernels round differently)."""
    applied = [1.0, -0.5, 2.0]
    fused, _ = _sgd_steps("cuda", [1e36] * skipped + applied, nesterov)  # 1e36 * 2**16 overflows: skipped
    unfused, _ = _sgd_steps("cpu", [1e36] * skipped + applied, nesterov)
    fused_without_skips, _ = _sgd_steps("cuda", applied, nesterov)
    assert torch.equal(fused[skipped - 1], torch.linspace(-1, 1, 12).reshape(3, 4))
    assert torch.equal(fused[skipped], unfused[skipped]), (fused[skipped] - unfused[skipped]).abs().max()
    for a, b, c in zip(fused[skipped:], fused_without_skips, unfused[skipped:]):
        assert torch.equal(a, b), (a - b).abs().max()
        torch.testing.assert_close(a, c)


def test_fused_sgd_resumed_without_momentum_state_steps_like_unfused_sgd(uninitialised_is_nan):
    """A checkpoint written before any applied step (no momentum buffers), resumed into fused SGD; and fused
    SGD's state dict (zero buffers, never stepped) resumed into unfused SGD."""
    _, empty = _sgd_steps("cpu", [], True)
    empty = empty.state_dict()
    losses = [1e36, 1.0, -0.5]
    _, resumed = _sgd_steps("cuda", [], True, resume_from=empty)
    (state,) = resumed.state.values()
    assert torch.equal(state["momentum_buffer"], torch.zeros(3, 4))
    fused, _ = _sgd_steps("cuda", losses, True, resume_from=empty)
    unfused, _ = _sgd_steps("cpu", losses, True, resume_from=empty)
    assert torch.equal(fused[1], unfused[1]) and torch.equal(fused[2], _sgd_steps("cuda", losses[1:], True)[0][1])
    _, never_stepped = _sgd_steps("cuda", [], True)
    resumed, _ = _sgd_steps("cpu", losses, True, resume_from=never_stepped.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed, unfused))


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


class Rank0Alone(distributed.Runtime):
    """Rank 0 of several CPU processes without a process group: its collectives before training (the agreed resume
    path, the listing's barrier) see rank 0's own values, as they would from every rank."""

    def barrier(self):
        pass

    def broadcast_object(self, obj):
        return obj


def as_rank_0_of(world_size):
    """distributed.setup_runtime's answer for rank 0 of ``world_size`` CPU processes, without joining a process group:
    what main.py checks and builds before training."""
    return lambda args, local_rank: Rank0Alone("cpu", torch.device("cpu"), rank=0, world_size=world_size,
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
