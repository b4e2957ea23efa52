"""The training recipe's pieces: which parameters decay, and the learning-rate schedule."""
import math

import torch


def parameter_groups(model, weight_decay, decay_norm_and_bias=False):
    """Weight decay on conv and linear weights only: BatchNorm parameters and biases (all 1-d) are left alone,
    as in the recipe behind torchvision's weights."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim > 1 or decay_norm_and_bias else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


DECAY_DEFAULTS = {"step": (30.0, 0.1), "exponential": (2.4, 0.97)}  # (every N epochs, times this factor)


def lr_schedule(optimizer, steps_per_epoch, warmup_epochs, epochs, kind="cosine", decay_epochs=None,
                decay_rate=None, warmup_start_factor=0.1, first_step=0):
    """Per-step LR factor: linear from 0.1x to 1x over the warm-up epochs, then

    - cosine: down to 0 at the last step;
    - step / exponential: times ``decay_rate`` every ``decay_epochs`` epochs, counted from the first step (a
      staircase, as TensorFlow's exponential_decay(staircase=True) in the MnasNet paper: 0.97 every 2.4 epochs;
      step defaults to 0.1 every 30 epochs).

    Stepped every iteration, so the scheduler's state alone puts a resumed run (even mid-epoch) on the
    right learning rate. ``first_step``: the step a fresh run starts at (--start-epoch), whose LR it starts with.
    """
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    total_steps = max(epochs * steps_per_epoch, 1)
    if kind != "cosine":
        default_epochs, default_rate = DECAY_DEFAULTS[kind]
        decay_steps = max((decay_epochs or default_epochs) * steps_per_epoch, 1)
        decay_rate = default_rate if decay_rate is None else decay_rate

    def factor(step):
        if step < warmup_steps:
            return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
        if kind != "cosine":
            return decay_rate ** math.floor(step / decay_steps)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    if first_step:
        # Built as if resumed at first_step - 1: the base LRs come from "initial_lr", which a fresh optimizer lacks.
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=first_step - 1)


def resume_schedule(optimizer, scheduler, base_lr=None):
    """After loading a checkpoint, set the LRs this run's schedule (its --epochs, --warmup...) gives at the saved
    step, from the first step on; with ``base_lr`` (a new --lr), scaled so that it is the base LR. Returns the
    factor the base LRs were scaled by."""
    factor = 1.0 if base_lr is None else base_lr / scheduler.base_lrs[0]
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group, base, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
    return factor


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as TensorFlow 1's RMSPropOptimizer, which the MnasNet paper trained with (decay 0.9, momentum 0.9,
    epsilon 1e-3):

        ms  = decay * ms + (1 - decay) * g^2          ms starts at 1, not 0
        mom = momentum * mom + lr * g / sqrt(ms + eps)
        w   = w - mom

    torch.optim.RMSprop differs in three ways that matter with these hyper-parameters: it adds eps outside the
    square root (1e-3 there is a different, much smaller damping), starts the mean square at 0 (huge first
    steps) and applies the learning rate after the momentum buffer (a changed LR acts on the whole buffer at once).
    Weight decay is added to the gradient (L2), as TensorFlow's regularisation loss does.
    """

    def __init__(self, params, lr, decay=0.9, momentum=0.9, eps=1e-3, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "decay": decay, "momentum": momentum, "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            for p in params:
                if not self.state[p]:
                    self.state[p] = {"square_avg": torch.ones_like(p), "momentum_buffer": torch.zeros_like(p)}
            square_avg = [self.state[p]["square_avg"] for p in params]
            momentum_buffer = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(square_avg, group["decay"])
            torch._foreach_addcmul_(square_avg, grads, grads, value=1.0 - group["decay"])
            root = torch._foreach_add(square_avg, group["eps"])
            torch._foreach_sqrt_(root)
            torch._foreach_mul_(momentum_buffer, group["momentum"])
            torch._foreach_addcdiv_(momentum_buffer, grads, root, value=group["lr"])
            torch._foreach_sub_(params, momentum_buffer)
        return loss


def model_ema(model, decay_per_step, every_steps):
    """An exponential moving average of the weights and of the BatchNorm statistics (torch.optim.swa_utils).

    Updated every ``every_steps`` steps with ``decay_per_step ** every_steps``: the same average as a per-step
    update to first order, for a fraction of the cost (each update also reads a counter back from the device).
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay_per_step ** every_steps), use_buffers=True)


def build_optimizer(kind, params, args):
    """SGD or the paper's TensorFlow-style RMSProp; SGD on NPU with apex is Ascend's fused SGD, which works on
    apex's combined gradient buffers."""
    if args.opt == "rmsprop":
        return RMSpropTF(params, lr=args.lr, decay=args.rmsprop_decay, momentum=args.momentum,
                                eps=args.opt_eps)
    if args.amp and args.amp_backend == "apex" and kind == "npu":
        from apex.optimizers import NpuFusedSGD
        return NpuFusedSGD(params, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    # CUDA's fused SGD also takes the native loss scaler's inf check on the device, where the unfused step reads
    # it on the host (GradScaler.step syncs once a step for it). Apex wraps optimizers its own way: left unfused.
    fused = kind == "cuda" and not (args.amp and args.amp_backend == "apex")
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov, fused=fused)
    if fused and args.momentum:
        _zero_momentum_buffers(optimizer)
        optimizer.register_load_state_dict_post_hook(_zero_momentum_buffers)
    return optimizer


def _zero_momentum_buffers(optimizer):
    """Give every parameter without one a zero momentum buffer. Fused SGD's first step allocates the buffers
    uninitialised (torch.empty_like) and keeps them even when the loss scaler skips that step, so the next step
    would apply garbage; from a zero buffer the first applied step is momentum * 0 + grad = grad, what an unfused
    SGD's first step (a copy of grad) gives, bit for bit."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
