"""--profile: a window of training steps recorded by the device's profiler (profiler_kit), one
TensorBoard trace per rank under <output-dir>/profile, and rank 0's top operators by self time in its log."""
import glob
import importlib
import os
from dataclasses import dataclass

import torch

from training.utils import UserError

TRACE_FOLDER = "profile"
TOP_OPERATORS = 15


def parse_steps(text):
    """'WAIT,WARMUP,ACTIVE' -> (wait, warmup, active): steps skipped, recorded and thrown away (the profiler's
    own start-up), recorded and kept."""
    try:
        wait, warmup, active = (int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--profile-steps must be three integers WAIT,WARMUP,ACTIVE, got {text!r}") from None
    if wait < 0 or warmup < 0 or active < 1:
        raise UserError(f"--profile-steps {text}: WAIT and WARMUP must be at least 0, ACTIVE at least 1")
    return wait, warmup, active


class WindowProfiler:
    """Records training steps wait+warmup+1 .. wait+warmup+active of the run's first epoch, once. ``step()`` after
    each training step; ``finish(log)`` after the epoch. The profiler only watches: no random numbers are drawn,
    so the run trains exactly as without it."""

    def __init__(self, kind, output_dir, rank, wait, warmup, active):
        self.kit = profiler_kit(kind)
        self.trace_dir = os.path.join(output_dir, TRACE_FOLDER)
        self.worker_name = f"rank{rank}"
        self.window = (wait, warmup, active)
        module = self.kit.module
        self.profile = module.profile(
            activities=self.kit.activities,
            schedule=module.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=module.tensorboard_trace_handler(self.trace_dir, worker_name=self.worker_name),
            **self.kit.options)
        self.profile.start()

    def step(self):
        self.profile.step()

    def finish(self, log, is_main):
        """Stop recording; rank 0 logs where the traces are and its top operators by self time."""
        self.profile.stop()
        if not is_main:
            return
        wait, warmup, active = self.window
        log.info(f"=> profiled training steps {wait + warmup + 1}-{wait + warmup + active}: traces in "
                 f"{self.trace_dir} (tensorboard --logdir {self.trace_dir}, with the torch-tb-profiler plugin, "
                 "or chrome://tracing, or https://ui.perfetto.dev)")
        log.info(self.top_operators())

    def top_operators(self):
        """The top operators of this rank's window by self time, as a table (text)."""
        if self.kit.sort_by is None:
            # torch_npu.profiler has no key_averages(): its analysis writes the operator tables.
            tables = sorted(glob.glob(os.path.join(self.trace_dir, f"{self.worker_name}_*_ascend_pt",
                                                   "ASCEND_PROFILER_OUTPUT", "operator_details.csv")))
            where = tables[-1] if tables else os.path.join(self.trace_dir, f"{self.worker_name}_*_ascend_pt",
                                                           "ASCEND_PROFILER_OUTPUT")
            return f"=> top operators: see {where} (and kernel_details.csv beside it)"
        table = self.profile.key_averages().table(sort_by=self.kit.sort_by, row_limit=TOP_OPERATORS)
        return (f"=> top {TOP_OPERATORS} operators by self time (ProfilerStep* is the steps' time outside "
                f"operators: Python, the loader)\n{table}")


@dataclass
class ProfilerKit:
    """What ``--profile`` records with on this device: ``module`` (torch.profiler, or torch_npu.profiler, which
    has the same ``profile``, ``schedule`` and ``tensorboard_trace_handler(dir_name, worker_name)``), the
    ``activities`` to record, extra ``options`` for ``module.profile`` and ``sort_by``, the key_averages() column
    of the top-operators table (None: the module has no key_averages, it writes its own operator tables)."""
    module: object
    activities: list
    options: dict
    sort_by: str = None


def profiler_kit(kind):
    """torch.profiler on the CPU and CUDA; on the NPU torch_npu.profiler (torch_npu/profiler/__init__.py), whose
    analysis of a trace writes ASCEND_PROFILER_OUTPUT/operator_details.csv and kernel_details.csv beside it.
    Level1 adds the AI Core kernels' pipeline use to those tables (experimental_config.py)."""
    if kind == "npu":
        npu_profiler = importlib.import_module("torch_npu.profiler")
        config = npu_profiler._ExperimentalConfig(profiler_level=npu_profiler.ProfilerLevel.Level1,
                                                  aic_metrics=npu_profiler.AiCMetrics.PipeUtilization)
        return ProfilerKit(npu_profiler, [npu_profiler.ProfilerActivity.CPU, npu_profiler.ProfilerActivity.NPU],
                           {"experimental_config": config})
    activities = [torch.profiler.ProfilerActivity.CPU]
    if kind == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return ProfilerKit(torch.profiler, activities, {},
                       "self_device_time_total" if kind == "cuda" else "self_cpu_time_total")
