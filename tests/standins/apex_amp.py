"""A CPU stand-in for ``apex.amp``: the optimizer and loss-scaler side of amp, without the fp16 casts.

Mirrored from NVIDIA apex at e13873de (the parent of cb65b8ed, which removed apex/amp in May 2025; tag 25.05 is
the last release with it) and from Ascend apex master's patch/npu.patch (49a7994, November 2023: the patch for
torch 2.x; line numbers are the patch file's):

* ``initialize``, ``state_dict``, ``load_state_dict``: apex/amp/frontend.py; the state lives in
  ``_amp_state.loss_scalers`` (apex/amp/_amp_state.py, re-exported by apex/amp/__init__.py).
* ``optimizer.zero_grad`` replaced by a method that takes no arguments (apex/amp/_process_optimizer.py
  ``_process_optimizer``): with master weights (O2) ``new_zero_grad_with_master_weights(self)`` (line 1478; with
  ``combine_grad`` ``new_zero_grad_accelerate_with_master_weights``, line 1495) zeroes the gradients in place;
  without (O1), with ``combine_grad`` (``optimizer.accelerate``, line 1688) or an NPU fused
  optimizer, ``new_zero_grad_accelerate_no_master_weights(self)`` (line 1816) calls the optimizer's own
  ``zero_grad()`` (torch 2.x's frees the gradients) until the gradients are combined, then zeroes the combined
  buffers in place. They are combined after the first backward (``post_backward_no_master_weights`` ->
  ``combined_init_no_master_weights``, lines 1102-1107, 1197-1242) into buffers whose views the parameters' grads
  become, so from then on the grads must stay the same tensors; here the combined buffers are the gradients as the
  first backward left them.
* ``torch.nn.Module.zero_grad`` replaced, with ``combine_grad`` or an NPU fused optimizer, by apex/amp/_initialize.py
  ``zero_grad(self, set_to_none=False)`` (lines 292-315, installed at 403-414), which asserts
  ``set_to_none is False`` (torch 2.x's default is True); ``install`` has it put back after each test.
* For the tests only (not apex's): ``initialized_optimizers`` lists what ``initialize`` patched, and each
  optimizer's ``_amp_stash.zeroed_grads`` the gradients each in-place ``zero_grad()`` zeroed.
* ``scale_loss``: apex/amp/handle.py: yields ``loss.float() * loss_scale``; on exit clears the overflow state,
  unscales (``_post_amp_backward``), calls ``update_scale()`` and on overflow swaps ``optimizer.step`` for a
  ``skip_step`` that puts the real step back.
* ``LossScaler``: apex/amp/scaler.py: ``unscale_python`` checks for overflow only when ``dynamic``
  (``check_overflow=self.dynamic``), ``update_scale`` halves a dynamic scale on overflow and returns should_skip,
  doubles it after ``scale_window`` clean steps; a static scale never checks, never skips, never moves.
"""
import contextlib
import sys
import types

import torch


class AmpState:
    def __init__(self):
        self.loss_scalers = []


_amp_state = AmpState()
initialized_optimizers = []


class LossScaler:
    def __init__(self, loss_scale, init_scale=2. ** 16, scale_factor=2., scale_window=2000, min_loss_scale=None,
                 max_loss_scale=2. ** 24):
        self.dynamic = loss_scale == "dynamic"
        self._loss_scale = min(max_loss_scale, init_scale) if self.dynamic else loss_scale
        self._max_loss_scale = max_loss_scale
        self._min_loss_scale = min_loss_scale
        self._scale_seq_len = scale_window
        self._unskipped = 0
        self._has_overflow = False

    def loss_scale(self):
        return self._loss_scale

    def unscale_python(self, grads, scale):
        for grad in grads:
            if self.dynamic:
                total = float(grad.float().sum())
                self._has_overflow = total in (float("inf"), -float("inf")) or total != total
                if self._has_overflow:
                    break
            grad.mul_(scale)

    def clear_overflow_state(self):
        self._has_overflow = False

    def update_scale(self):
        if self._has_overflow and self.dynamic:
            should_skip = True
            self._loss_scale = (max(self._min_loss_scale, self._loss_scale / 2.) if self._min_loss_scale
                                else self._loss_scale / 2.)
            self._unskipped = 0
        else:
            should_skip = False
            self._unskipped += 1
        if self._unskipped == self._scale_seq_len and self.dynamic:
            self._loss_scale = min(self._max_loss_scale, self._loss_scale * 2.)
            self._unskipped = 0
        return should_skip


def _grads(optimizer):
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def zero_grad(self, set_to_none: bool = False) -> None:
    assert set_to_none is False, "For combined grad, `set_to_none` must be False."
    for p in self.parameters():
        if p.grad is not None:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


def _post_amp_backward(self, loss_scaler):
    stash = self._amp_stash
    if (self.accelerate or self.is_npu_fused_optimizer) and not stash.already_combined:
        stash.combined_grads = _grads(self)
        stash.already_combined = True
    loss_scaler.unscale_python(_grads(self), 1. / loss_scaler.loss_scale())


def _zero_in_place(self, grads):
    for grad in grads:
        grad.detach_()
        grad.zero_()
    self._amp_stash.zeroed_grads.append(grads)


def _new_zero_grad_with_master_weights(self):
    _zero_in_place(self, _grads(self))


def _new_zero_grad_accelerate_no_master_weights(old_zero_grad):
    def new_zero_grad(self):
        stash = self._amp_stash
        if not stash.already_combined:
            old_zero_grad()
            return
        _zero_in_place(self, stash.combined_grads)
    return new_zero_grad


def initialize(models, optimizers=None, enabled=True, opt_level="O1", loss_scale=None, combine_grad=None, **kwargs):
    if opt_level not in ("O0", "O1", "O2", "O3"):
        raise RuntimeError(f"Unexpected optimization level {opt_level}. Options are 'O0', 'O1', 'O2', 'O3'.")
    if loss_scale is None:
        loss_scale = "dynamic" if opt_level in ("O1", "O2") else 1.0
    _amp_state.loss_scalers = [LossScaler(loss_scale)]
    optimizer = optimizers
    optimizer._amp_stash = types.SimpleNamespace(already_patched=False, params_have_scaled_gradients=False,
                                                 already_combined=False, combined_grads=[], zeroed_grads=[])
    optimizer.accelerate = combine_grad
    optimizer.is_npu_fused_optimizer = getattr(optimizer, "is_npu_fused_optimizer", False)
    optimizer._post_amp_backward = types.MethodType(_post_amp_backward, optimizer)
    if opt_level == "O2":
        optimizer.zero_grad = types.MethodType(_new_zero_grad_with_master_weights, optimizer)
    elif optimizer.accelerate or optimizer.is_npu_fused_optimizer:
        optimizer.zero_grad = types.MethodType(_new_zero_grad_accelerate_no_master_weights(optimizer.zero_grad),
                                               optimizer)
    if combine_grad or optimizer.is_npu_fused_optimizer:
        torch.nn.Module.zero_grad = zero_grad
    initialized_optimizers.append(optimizer)
    return models, optimizer


@contextlib.contextmanager
def scale_loss(loss, optimizers, loss_id=0, model=None, delay_unscale=False, delay_overflow_check=False):
    optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else optimizers
    loss_scaler = _amp_state.loss_scalers[loss_id]
    yield loss.float() * loss_scaler.loss_scale()
    loss_scaler.clear_overflow_state()
    for optimizer in optimizers:
        optimizer._post_amp_backward(loss_scaler)
    should_skip = False if delay_overflow_check else loss_scaler.update_scale()
    if should_skip:
        for optimizer in optimizers:
            if not optimizer._amp_stash.already_patched:
                def patch_step(opt):
                    opt_step = opt.step

                    def skip_step(closure=None):
                        opt.step = opt_step
                        opt._amp_stash.already_patched = False
                    return skip_step
                optimizer.step = patch_step(optimizer)
                optimizer._amp_stash.already_patched = True


def state_dict(destination=None):
    destination = {} if destination is None else destination
    for idx, loss_scaler in enumerate(_amp_state.loss_scalers):
        destination[f"loss_scaler{idx}"] = {"loss_scale": loss_scaler.loss_scale(), "unskipped": loss_scaler._unskipped}
    return destination


def load_state_dict(state_dict):
    for idx, key in enumerate(state_dict):
        if "loss_scaler" not in key:
            raise RuntimeError(f'Error(s) in loading state_dict. Unexpected key(s) in state_dict: "{key}". ')
        _amp_state.loss_scalers[idx]._loss_scale = state_dict[key]["loss_scale"]
        _amp_state.loss_scalers[idx]._unskipped = state_dict[key]["unskipped"]


def install(monkeypatch):
    """Make ``import apex.amp`` find this module for the rest of a test."""
    apex = types.ModuleType("apex")
    apex.amp = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.amp", apex.amp)
    monkeypatch.setattr(torch.nn.Module, "zero_grad", torch.nn.Module.zero_grad)  # initialize may replace it
    _amp_state.loss_scalers = []
    initialized_optimizers.clear()
