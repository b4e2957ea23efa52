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


def warmup_cosine_schedule(optimizer, steps_per_epoch, warmup_epochs, epochs, warmup_start_factor=0.1):
    """Per-step LR factor: linear from 0.1x to 1x over the warm-up epochs, then cosine down to 0.

    Stepped every iteration, so the scheduler's state alone puts a resumed run (even mid-epoch) on the
    right learning rate.
    """
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    total_steps = max(epochs * steps_per_epoch, 1)

    def factor(step):
        if step < warmup_steps:
            return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
