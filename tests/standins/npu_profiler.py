"""Stand-in for torch_npu.profiler (torch_npu 2.14.0 wheel, torch_npu/profiler/), for profiling.profiler_kit's NPU
branch. ``install(monkeypatch)`` puts it in sys.modules as ``torch_npu.profiler`` (and a bare ``torch_npu``).

Mirrors, keyword-only and with the same names, so a misspelled argument fails as it would there:
  - profiler.py ``profile(*, activities, schedule, on_trace_ready, record_shapes, profile_memory, with_stack,
    with_flops, with_modules, experimental_config, execution_trace_observer, custom_trace_id_callback,
    use_cuda)`` with start()/step()/stop(); it has no key_averages(). Its actions follow the schedule as
    _profiler_action_controller.py does: on leaving RECORD_AND_SAVE it calls ``on_trace_ready(prof)``.
  - profiler.py ``tensorboard_trace_handler(dir_name=None, worker_name=None, analyse_flag=True,
    async_mode=False)``: the trace goes to <dir_name>/<worker_name>_<pid>_<time>_ascend_pt
    (_profiler_path_creator.py), whose analysis writes ASCEND_PROFILER_OUTPUT/operator_details.csv
    (analysis/prof_view/_operator_view_parser.py).
  - scheduler.py ``Schedule(wait, active, warmup=0, repeat=0, skip_first=0, skip_first_wait=0)`` (exported as
    ``schedule``) and ``ProfilerAction``.
  - experimental_config.py ``_ExperimentalConfig(profiler_level, aic_metrics, l2_cache, ...)``, ``ProfilerLevel``
    and ``AiCMetrics`` (constants from analysis/prof_common_func/_constant.py).
  - torch_npu._C._profiler ``ProfilerActivity`` (CPU, NPU).
Every profile made is appended to ``PROFILES``.
"""
import enum
import os
import sys
import time
import types

PROFILES = []


class ProfilerActivity(enum.Enum):
    CPU = 0
    NPU = 1


class ProfilerLevel:
    Level0 = "Level0"
    Level1 = "Level1"
    Level2 = "Level2"
    Level_none = "Level_none"


class AiCMetrics:
    PipeUtilization = "ACL_AICORE_PIPE_UTILIZATION"
    ArithmeticUtilization = "ACL_AICORE_ARITHMETIC_UTILIZATION"
    Memory = "ACL_AICORE_MEMORY_BANDWIDTH"
    MemoryL0 = "ACL_AICORE_L0B_AND_WIDTH"
    MemoryUB = "ACL_AICORE_MEMORY_UB"
    ResourceConflictRatio = "ACL_AICORE_RESOURCE_CONFLICT_RATIO"
    L2Cache = "ACL_AICORE_L2_CACHE"
    MemoryAccess = "ACL_AICORE_MEMORY_ACCESS"
    AiCoreNone = "ACL_AICORE_NONE"


class ProfilerAction(enum.Enum):
    NONE = 0
    WARMUP = 1
    RECORD = 2
    RECORD_AND_SAVE = 3


class Schedule:
    def __init__(self, wait, active, warmup=0, repeat=0, skip_first=0, skip_first_wait=0):
        self.wait, self.active, self.warmup, self.repeat = wait, active, warmup, repeat
        self.skip_first, self.skip_first_wait = skip_first, skip_first_wait

    def __call__(self, step):
        if step < self.skip_first:
            return ProfilerAction.NONE
        step -= self.skip_first
        if self.skip_first_wait != 0:
            step += self.wait
        num_steps = self.wait + self.warmup + self.active
        if self.repeat > 0 and step / num_steps >= self.repeat:
            return ProfilerAction.NONE
        mod_step = step % num_steps
        if mod_step < self.wait:
            return ProfilerAction.NONE
        if mod_step < self.wait + self.warmup:
            return ProfilerAction.WARMUP
        return ProfilerAction.RECORD if mod_step < num_steps - 1 else ProfilerAction.RECORD_AND_SAVE


schedule = Schedule  # torch_npu/profiler/__init__.py: from .scheduler import Schedule as schedule


class _ExperimentalConfig:
    def __init__(self, profiler_level=ProfilerLevel.Level0, aic_metrics=AiCMetrics.PipeUtilization, l2_cache=False,
                 msprof_tx=False, mstx=False, data_simplification=True, record_op_args=False, op_attr=False,
                 gc_detect_threshold=None, export_type="text", host_sys=None, mstx_domain_include=None,
                 mstx_domain_exclude=None, sys_io=False, sys_interconnection=False):
        self.profiler_level = profiler_level
        self.aic_metrics = aic_metrics


def tensorboard_trace_handler(dir_name=None, worker_name=None, analyse_flag=True, async_mode=False):
    def handler_fn(prof_inst):
        span = f"{worker_name}_{os.getpid()}_{time.strftime('%Y%m%d%H%M%S')}000_ascend_pt"
        output = os.path.join(dir_name, span, "ASCEND_PROFILER_OUTPUT")
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "operator_details.csv"), "w") as handle:
            handle.write("Name,Input Shapes,Call Stack,Host Self Duration(us),Host Total Duration(us)\n")
        prof_inst.saved_at_step = prof_inst.step_num

    handler_fn.dir_name, handler_fn.worker_name = dir_name, worker_name
    return handler_fn


class profile:
    def __init__(self, *, activities=None, schedule=None, on_trace_ready=None, record_shapes=False,
                 profile_memory=False, with_stack=False, with_flops=False, with_modules=False,
                 experimental_config=None, execution_trace_observer=None, custom_trace_id_callback=None,
                 use_cuda=None):
        self.activities = list(activities or ())
        self.schedule = schedule
        self.on_trace_ready = on_trace_ready
        self.experimental_config = experimental_config
        self.step_num = 0
        self.current_action = schedule(0)
        self.saved_at_step = None
        self.stopped = True
        PROFILES.append(self)

    def start(self):
        self.stopped = False

    def step(self):
        previous = self.current_action
        self.step_num += 1
        self.current_action = self.schedule(self.step_num)
        if previous == ProfilerAction.RECORD_AND_SAVE and self.on_trace_ready:
            self.on_trace_ready(self)

    def stop(self):
        if self.current_action == ProfilerAction.RECORD_AND_SAVE and self.on_trace_ready:
            self.on_trace_ready(self)
        self.stopped = True


def install(monkeypatch):
    """Make ``import torch_npu.profiler`` find this module; returns it."""
    module = sys.modules[__name__]
    package = sys.modules.get("torch_npu") or types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", package)
    monkeypatch.setitem(sys.modules, "torch_npu.profiler", module)
    monkeypatch.setattr(package, "profiler", module, raising=False)
    PROFILES.clear()
    return module
