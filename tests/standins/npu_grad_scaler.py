"""A CPU stand-in for torch_npu's ``torch.npu.amp.GradScaler``, for its checkpoint format.

Mirrored from torch_npu 2.14.0, torch_npu/npu/amp/grad_scaler.py ``GradScaler``: the constructor's ``dynamic``
flag, ``state_dict`` (torch.amp's plus ``"dynamic"``) and ``load_state_dict`` (refuses an empty dict, then reads
``state_dict["dynamic"]``: a KeyError for torch.amp's state dict). Scaling, unscaling and skipping are torch.amp's
CPU ones; torch_npu's keep the same per-optimizer ``found_inf_per_device`` record until ``update()``.
"""
import torch


class GradScaler(torch.amp.GradScaler):
    def __init__(self, init_scale=2. ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 dynamic=True, enabled=True):
        super().__init__("cpu", init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled)
        self._dynamic = dynamic

    def state_dict(self):
        state = super().state_dict()
        if self._enabled:
            state["dynamic"] = self._dynamic
        return state

    def load_state_dict(self, state_dict):
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        super().load_state_dict(state_dict)
        self._dynamic = state_dict["dynamic"]
