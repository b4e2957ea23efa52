"""The precision engines: fp32 (``Precision``), torch.amp with its loss scaler (``NativeAmp``) and NVIDIA /
Ascend apex (``ApexAmp``); the loops only call their autocast, backward and step."""
import contextlib
import importlib

import torch
import torch.nn as nn

from training.utils import UserError


def _gradients_finite(optimizer):
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


class Precision:
    """fp32, or mixed precision with native torch.amp (autocast + GradScaler) or apex.amp.

    The loops call ``autocast()``, ``step(loss, optimizer)`` and, for checkpoints, ``state_dict()``; which
    engine is behind them is chosen once in ``build_precision``. ``step`` returns whether the weights were
    updated (a bool, or a bool tensor on the device where a loss scaler decides): a step whose gradients are not
    finite is skipped, so the weights stay those of the last good step.
    """

    name = "fp32"
    has_scaler = False

    def autocast(self):
        return contextlib.nullcontext()

    def eval_autocast(self):
        return self.autocast()

    def prepare(self, model):
        """Adapt the model to this precision before training; returns it."""
        return model

    def backward(self, loss, optimizer):
        loss.backward()

    def zero_grad(self, optimizer):
        optimizer.zero_grad(set_to_none=True)

    def step(self, loss, optimizer):
        self.zero_grad(optimizer)
        self.backward(loss, optimizer)
        return self.optimizer_step(optimizer)

    def optimizer_step(self, optimizer):
        # One host sync per step; DDP has averaged the gradients, so every rank decides alike.
        if not _gradients_finite(optimizer):
            return False
        optimizer.step()
        return True

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class NativeAmp(Precision):
    """torch.amp: autocast in ``dtype``, with a loss scaler for float16 (torch.amp's GradScaler; torch_npu's on NPU).

    dtype "auto" is float16 on NPU/CUDA and, on the CPU, bfloat16 where the CPU computes it natively (AVX512-BF16,
    AMX; elsewhere it stays fp32). float16 on the CPU is slow, but runs torch's own loss scaler (skip, halve, grow)
    as on a GPU: the tests' and ``tools/device_check.sh --device cpu``'s fp16. CPU training keeps the depthwise
    convolutions in fp32 (``prepare``): bf16 inference runs 2-3x faster than fp32 there, bf16 training with every
    layer in bf16 0.7x, with the depthwise layers in fp32 1.16-1.18x (bench.py)."""

    DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

    def __init__(self, kind, loss_scale, dtype="auto", init_scale=2.0 ** 16):
        self.device_type = kind
        if dtype == "auto":
            self.dtype = torch.bfloat16 if kind == "cpu" else torch.float16
            native = kind != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        else:
            self.dtype, native = self.DTYPES[dtype], True
        self.train_enabled = self.eval_enabled = native
        self.name = (f"native {str(self.dtype).replace('torch.', '')}" if kind != "cpu" else
                     "fp32 (this CPU has no native bf16)" if not native else
                     f"{'bf16' if self.dtype == torch.bfloat16 else 'fp16'}, depthwise convolutions fp32 in training")
        options = {"enabled": self.dtype == torch.float16}
        # A fixed scale stays fixed: the scaler still finds and skips overflowing steps, and ``optimizer_step`` hands
        # it the same scale back at every update (GradScaler refuses a backoff factor of 1; torch_npu's
        # dynamic=False would not even look for overflows).
        self.fixed_scale = None if loss_scale == "dynamic" else float(loss_scale)
        options["init_scale"] = init_scale if self.fixed_scale is None else self.fixed_scale
        # Ascend documents its own GradScaler (torch.npu.amp); CUDA and CPU use torch.amp's.
        self.scaler = torch.npu.amp.GradScaler(**options) if kind == "npu" else torch.amp.GradScaler(kind, **options)
        self.has_scaler = self.scaler.is_enabled()

    def prepare(self, model):
        """On the CPU, hooks that run each depthwise convolution in fp32 while the model trains under autocast.

        oneDNN's bf16 depthwise convolution backward is 3.7x slower than its fp32 one on this CPU (137 vs 37 ms a
        step for mnasnet1_0's 1152-channel 5x5 layers at batch 32), while bf16 pays off in the pointwise ones and
        halves the bytes BatchNorm and ReLU move. Hooks leave the module tree, and so the state dict, as it is;
        in eval mode they do nothing (the bf16 depthwise forward is fast).
        """
        if self.device_type == "cpu" and self.train_enabled:
            for module in model.modules():
                if isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels:
                    module.register_forward_pre_hook(_leave_autocast)
                    module.register_forward_hook(_return_to_autocast)
        return model

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.train_enabled)

    def eval_autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.eval_enabled)

    def backward(self, loss, optimizer):
        self.scaler.scale(loss).backward()

    def optimizer_step(self, optimizer):
        if not self.has_scaler:
            return super().optimizer_step(optimizer)
        self.scaler.step(optimizer)
        # The scaler skipped the step if it found inf/NaN gradients. Its record of them (torch.amp's and torch_npu's
        # scalers keep it alike until update()) is read on the device, adding no host sync: with CUDA's fused SGD the
        # step has none. torch_npu's scaler reads it on the host itself, 2-3 times a step (docs/devices.md).
        found_inf = self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values()
        applied = sum(found_inf) == 0
        self.scaler.update(self.fixed_scale)
        return applied

    def state_dict(self):
        return {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}

    def load_state_dict(self, state):
        """A dynamic scale goes on from the checkpoint, whichever device kind or backend wrote it (an Ascend apex
        run may go on on CUDA, where apex.amp is gone); a fixed one is the command line's. Only the scale and its
        growth count are taken over: the settings are this run's, and torch_npu's GradScaler saves (and requires on
        loading) a "dynamic" flag that torch.amp's lacks."""
        saved = state.get("scaler") or _scaler_state_from_apex(state.get("apex"))
        if saved and self.scaler.is_enabled() and self.fixed_scale is None:
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": saved["scale"],
                                         "_growth_tracker": saved["_growth_tracker"]})


def _scaler_state_from_apex(apex_state):
    """apex's loss scale and its count of steps since the last overflow, as GradScaler names them."""
    if not apex_state or "loss_scaler0" not in apex_state:
        return None
    loss_scaler = apex_state["loss_scaler0"]
    return {"scale": loss_scaler["loss_scale"], "_growth_tracker": loss_scaler["unskipped"]}


def _leave_autocast(module, args):
    module.left_autocast = module.training and torch.is_autocast_enabled("cpu")
    if module.left_autocast:
        torch.set_autocast_enabled("cpu", False)
        return tuple(arg.float() for arg in args)
    return None


def _return_to_autocast(module, args, output):
    if module.left_autocast:
        torch.set_autocast_enabled("cpu", True)
        return output.to(torch.get_autocast_dtype("cpu"))
    return None


class ApexAmp(Precision):
    """NVIDIA apex.amp, or Ascend's apex fork on NPU (where combine_grad fuses the gradient buffers)."""

    has_scaler = True

    def __init__(self, amp_module, opt_level, loss_scale):
        self.amp = amp_module
        self.dynamic = loss_scale == "dynamic"
        self.name = f"apex {opt_level}" + ("" if self.dynamic else f", fixed loss scale {loss_scale}")

    def zero_grad(self, optimizer):
        # apex O2 and Ascend's combined gradients replace zero_grad with one that takes no arguments and zeroes the
        # gradients in place; Ascend's combined buffers must never be freed or re-allocated.
        optimizer.zero_grad()

    def backward(self, loss, optimizer):
        with self.amp.scale_loss(loss, optimizer) as scaled_loss:
            scaled_loss.backward()

    def optimizer_step(self, optimizer):
        if not self.dynamic:
            # A static apex scale checks nothing (LossScaler.unscale passes check_overflow=self.dynamic).
            return super().optimizer_step(optimizer)
        # Leaving scale_loss, apex's loss scaler read its overflow flag (on the host) and, on overflow, swapped
        # optimizer.step for a skip that puts the real step back: called either way.
        overflowed = any(scaler._has_overflow for scaler in self.amp._amp_state.loss_scalers)
        optimizer.step()
        return not overflowed

    def state_dict(self):
        return {"apex": self.amp.state_dict()}

    def load_state_dict(self, state):
        """As NativeAmp's: a dynamic scale goes on from the checkpoint, apex's or GradScaler's; a fixed one is the
        command line's."""
        if not self.dynamic:
            return
        if "apex" in state:
            self.amp.load_state_dict(state["apex"])
        elif "scaler" in state:
            self.amp.load_state_dict({"loss_scaler0": {"loss_scale": float(state["scaler"]["scale"]),
                                                       "unskipped": int(state["scaler"]["_growth_tracker"])}})


def import_apex_amp(kind):
    try:
        return importlib.import_module("apex.amp")
    except ImportError as exc:
        if kind == "cuda":
            raise UserError("--amp-backend apex: no apex.amp here; NVIDIA apex removed it in 2025 (25.05 was the "
                            "last release with it): use native mixed precision, --amp (--amp-backend native), "
                            "which is O1-style autocast") from None
        raise UserError(f"--amp-backend apex: Ascend apex cannot be imported ({exc}); install it, or use the default "
                        "--amp-backend native") from None


def build_precision(kind, model, optimizer, args):
    """Returns (model, optimizer, precision); apex wraps the model and optimizer itself."""
    if not args.amp:
        return model, optimizer, Precision()
    if args.amp_backend == "native":
        precision = NativeAmp(kind, args.loss_scale, args.amp_dtype, args.init_loss_scale)
        return precision.prepare(model), optimizer, precision
    amp = import_apex_amp(kind)
    loss_scale = args.loss_scale if args.loss_scale == "dynamic" else float(args.loss_scale)
    options = {"opt_level": args.opt_level, "loss_scale": loss_scale}
    if kind == "npu" and args.opt == "sgd":
        options["combine_grad"] = True  # only NpuFusedSGD reads the combined buffers
    model, optimizer = amp.initialize(model, optimizer, **options)
    precision = ApexAmp(amp, args.opt_level, args.loss_scale)
    if precision.dynamic:
        # amp.initialize takes no first scale; its state dict (what a checkpoint restores) sets one.
        amp.load_state_dict({"loss_scaler0": {"loss_scale": args.init_loss_scale, "unskipped": 0}})
    return model, optimizer, precision
