"""The device layer: which accelerator, which process group, which precision engine.

Everything that differs between Ascend NPUs (torch_npu, HCCL, Ascend apex), NVIDIA GPUs (CUDA, NCCL)
and the CPU (gloo) is decided here, once. The train and eval loops only call the objects built here.
"""
import contextlib
import datetime
import importlib
import inspect
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import recipe
from utils import STOP_SIGNALS, UserError, first_line

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


CANN_HINT = ("source CANN's set_env.sh first (/usr/local/Ascend/cann/set_env.sh, or ascend-toolkit/set_env.sh "
             "before CANN 8.5; test/env_npu.sh finds it)")


def _import_torch_npu():
    """Import torch_npu (only ever imported here), which registers torch.npu; False when it is not installed.

    torch's autoloading is off (autoload_off.py), so every process of an NPU run comes here, spawned workers too.
    An installed torch_npu that cannot load raises UserError with its reason: without CANN's environment its
    extension finds no libhccl.so / libascendcl.so (ImportError, torch_npu/_init/core/module_loader.py); it
    raises RuntimeError next to another accelerator (torch_npu/__init__.py) and Exception when ASCEND_HOME_PATH
    names no CANN (torch_npu/_init/registry/registry_manager.py).
    """
    try:
        importlib.import_module("torch_npu")
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "torch_npu":
            return False
        raise UserError(f"torch_npu cannot be loaded ({first_line(exc)})") from None
    return True


def _npu_available():
    """Whether torch_npu loads and sees a device; raises UserError when it is installed but cannot load."""
    return _import_torch_npu() and torch.npu.is_available() and torch.npu.device_count() > 0


def resolve_device_kind(requested):
    """Map --device to 'npu', 'cuda' or 'cpu', checking that the device is really there. Only 'npu' and 'auto'
    touch torch_npu: a CPU or GPU run does not depend on it."""
    requested = "cuda" if requested == "gpu" else requested
    if requested == "auto":
        fallback = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            if _npu_available():
                return "npu"
        except UserError as exc:
            print(f"note: --device auto: {exc}; running on {fallback}. For the NPU, {CANN_HINT}", file=sys.stderr)
        return fallback
    if requested == "npu":
        try:
            installed = _import_torch_npu()
        except UserError as exc:
            raise UserError(f"--device npu: {exc}; {CANN_HINT}") from None
        if not installed:
            raise UserError("--device npu: torch_npu is not installed: pip install -r requirements-npu.txt, then "
                            + CANN_HINT)
        if not (torch.npu.is_available() and torch.npu.device_count() > 0):
            raise UserError("--device npu: torch_npu is installed but sees no NPU")
    elif requested == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA GPU is visible to PyTorch")
    return requested


def device_module(kind):
    """torch.npu / torch.cuda, which share the same API; None for the CPU."""
    return getattr(torch, kind) if kind in ("npu", "cuda") else None


def device_count(kind):
    return device_module(kind).device_count() if kind != "cpu" else os.cpu_count() or 1


def parse_device_list(text, kind):
    """'0,1,2' -> [0, 1, 2], each checked against the devices present."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise UserError(f"--device-list must be comma-separated integers, got {text!r}") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise UserError(f"--device-list must list distinct non-negative device ids, got {text!r}")
    if kind != "cpu":
        present = device_count(kind)
        missing = [i for i in ids if i >= present]
        if missing:
            raise UserError(f"--device-list asks for {kind} device(s) {missing}, but only {present} are present")
    return ids


def launched_by_torchrun():
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def launched_by_slurm():
    """An srun step of several tasks. SLURM_STEP_NUM_TASKS, which only srun sets, tells its tasks from an sbatch
    script's own shell: that one also carries SLURM_PROCID and SLURM_NTASKS but is a single process."""
    return ("SLURM_STEP_NUM_TASKS" in os.environ and all(name in os.environ for name in SLURM_VARIABLES)
            and int(os.environ["SLURM_NTASKS"]) > 1)


def launcher_ranks():
    """(rank, world size, local rank) set by torchrun (which wins, e.g. torchrun run by srun) or srun; None when
    neither started this process."""
    if launched_by_torchrun():
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if launched_by_slurm():
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return None


def processes_on_this_node(args):
    """How many processes of this run share this node's CPUs: torchrun's LOCAL_WORLD_SIZE, srun's tasks on this
    node, or --device-list's length for --multiprocessing-distributed."""
    if launched_by_torchrun():
        return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if launched_by_slurm():
        return _slurm_tasks_on_this_node()
    return len(args.device_ids) if args.multiprocessing_distributed else 1


def _slurm_tasks_on_this_node():
    """SLURM_STEP_TASKS_PER_NODE lists the step's tasks per node, compressed ("2(x3),1"), in SLURM_NODEID's
    order; SLURM_NTASKS_PER_NODE is set for --ntasks-per-node. Neither: count every task (too few CPUs each
    rather than too many)."""
    per_node = []
    for part in os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match:
            per_node += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(os.environ.get("SLURM_NODEID", "0"))
    if node < len(per_node):
        return per_node[node]
    return int(os.environ.get("SLURM_NTASKS_PER_NODE", os.environ["SLURM_NTASKS"]))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_distributed_args(args):
    """--world-size/--rank/--dist-url, checked before any process starts: numbered nodes without
    --multiprocessing-distributed would each train alone, and several nodes without a common rendezvous address
    would wait for each other until --dist-timeout."""
    if not args.multiprocessing_distributed:
        if (args.world_size, args.rank) != (1, 0):
            raise UserError("--world-size and --rank number the nodes of a --multiprocessing-distributed run: add "
                            "--multiprocessing-distributed (torchrun and srun number their processes themselves)")
        if args.dist_url != "env://" and (launched_by_torchrun() or not launched_by_slurm()):
            raise UserError("--dist-url is the rendezvous of --multiprocessing-distributed or srun processes: add "
                            "--multiprocessing-distributed (under torchrun, give torchrun --master-addr/--master-port)")
        return
    if args.world_size < 1 or not 0 <= args.rank < args.world_size:
        raise UserError(f"--rank {args.rank} must be a node number below --world-size {args.world_size}")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if args.world_size > 1 and args.dist_url == "env://" and missing:
        raise UserError(f"--world-size {args.world_size}: {' and '.join(missing)} not set, and every node needs node "
                        "0's address: give every node --dist-url tcp://NODE0:PORT, or export MASTER_ADDR and "
                        "MASTER_PORT")


def launch(worker, args):
    """Run ``worker(local_rank, args)`` in the right number of processes.

    torchrun (or any launcher setting RANK/WORLD_SIZE/LOCAL_RANK) or srun already made the processes; the
    reference's 8p mode spawns one per entry of --device-list on this node; otherwise one process.
    """
    ranks = launcher_ranks()
    if ranks is not None:
        worker(ranks[2], args)
    elif args.multiprocessing_distributed:
        nprocs = len(args.device_ids)
        if args.dist_url == "env://" and args.world_size == 1:
            # One node, no rendezvous given: a free local port, so two jobs on one host never collide. Several
            # nodes must agree on one address: check_distributed_args has made sure it was given.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        context = mp.start_processes(worker, args=(args,), nprocs=nprocs, join=False, start_method="spawn")

        def forward(signum, frame):
            # A signal to this process alone (a scheduler's SIGTERM) reaches the workers, which save and stop.
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, signum)

        previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
        try:
            while not context.join():
                pass
        except mp.ProcessExitedException as exc:
            # The failing worker already said why; exit with its status rather than a traceback.
            # A worker killed by a signal has exit_code -signum: the shell's 128 + signum.
            raise SystemExit(exc.exit_code if exc.exit_code > 0 else 128 - exc.exit_code) from None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    else:
        worker(0, args)


@dataclass
class Runtime:
    """Where this process runs and with whom."""
    kind: str
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    memory_format: torch.memory_format = torch.contiguous_format
    local_world_size: int = 1  # processes on this node, which share its CPUs
    kernel_settings: str = "as the libraries set them"  # for the start-up log (apply_kernel_settings)

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def label_dtype(self):
        # Ascend kernels take int32 class indices; CUDA and CPU losses want int64.
        return torch.int32 if self.kind == "npu" else torch.int64

    @property
    def pin_memory(self):
        return self.kind != "cpu"

    def synchronize(self):
        if self.kind != "cpu":
            device_module(self.kind).synchronize(self.device)

    def all_reduce_sum(self, tensor):
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj):
        """[rank 0's obj, rank 1's obj, ...] (a collective)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_buffers(self, model):
        """Give every rank rank 0's BatchNorm statistics, so all ranks evaluate the weights that rank 0 saves."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def data_parallel(self, model):
        """DDP without a buffer sync at every forward (``Runtime.broadcast_buffers`` gives validation rank 0's
        BatchNorm statistics instead). torch 2.13 deprecated that option's name ``broadcast_buffers`` for
        ``forward_sync_buffers`` (the old name gives a FutureWarning); ``forward_sync_buffers=False`` still copies
        rank 0's buffers once, when DDP wraps the model. Older torch knows only the old name."""
        parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
        return nn.parallel.DistributedDataParallel(model, device_ids=None if self.kind == "cpu" else [self.device],
                                                   **{no_sync: False})

    def max_memory_allocated(self):
        return device_module(self.kind).max_memory_allocated(self.device) if self.kind != "cpu" else None


def setup_runtime(args, local_rank):
    """Bind this process to its device and join the process group (a no-op for one process)."""
    kind = args.device_kind
    if kind == "npu" and not _import_torch_npu():
        raise UserError("--device npu: torch_npu is not installed in this process's Python")
    ranks = launcher_ranks()
    if ranks is not None:
        rank, world_size, _ = ranks
    elif args.multiprocessing_distributed:
        nprocs = len(args.device_ids)
        world_size = args.world_size * nprocs
        rank = args.rank * nprocs + local_rank
    else:
        rank, world_size = 0, 1

    if kind == "cpu":
        device = torch.device("cpu")
    else:
        ids = args.device_ids
        if device_count(kind) == 1 and _given_its_own_device(kind):
            # This process sees one device, its own (srun --gpus-per-task=1, *_VISIBLE_DEVICES set per process).
            index = 0
        elif local_rank < len(ids):
            index = ids[local_rank]
        else:
            raise UserError(f"local rank {local_rank} has no device: --device-list names only {ids}")
        device = torch.device(kind, index)
        device_module(kind).set_device(device)
        # Every step's batch has the same shape: cuDNN times its convolution algorithms once and keeps the fastest
        # (which may differ between runs: not with --deterministic).
        torch.backends.cudnn.benchmark = kind == "cuda" and not args.deterministic
    kernel_settings = apply_kernel_settings(kind, args)

    if world_size > 1:
        backend = args.dist_backend or BACKENDS[kind]
        init_method = "env://" if launched_by_torchrun() else args.dist_url
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if init_method == "env://" and missing:
            raise UserError(f"{' and '.join(missing)} not set: export MASTER_ADDR (e.g. the first host of "
                            "$SLURM_JOB_NODELIST) and MASTER_PORT on every node, or give --dist-url tcp://HOST:PORT")
        try:
            with _signals_end_process():
                dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                                        timeout=datetime.timedelta(seconds=args.dist_timeout))
        except dist.DistError as exc:
            raise UserError(f"rank {rank} could not join the {world_size} processes at {init_method} "
                            f"(MASTER_ADDR/MASTER_PORT for env://): {first_line(exc)}") from None
    return Runtime(kind, device, rank, world_size, local_rank, _memory_format(args.memory_format, kind),
                   local_world_size=processes_on_this_node(args), kernel_settings=kernel_settings)


# --npu-jit-compile, --npu-internal-format and --tf32: "auto" leaves the library's own default.
SWITCHES = {"on": True, "off": False}
NPU_SETTINGS = ("npu_jit_compile", "npu_internal_format")


def apply_kernel_settings(kind, args):
    """Set this process's kernel options (every spawned worker sets its own, where Ascend asks for
    set_compile_mode to be called); returns the settings in effect, for the start-up log.

    NPU (torch_npu 2.14.0, torch_npu/npu/npu_config.py, exposed as torch.npu.* by torch_npu/npu/__init__.py):
    ``set_compile_mode(jit_compile=...)`` chooses online compilation (True) or prebuilt binary kernels (False:
    first steps take seconds instead of minutes); Ascend documents True as the default on Atlas training and
    inference series chips, False on Atlas A2/A3. ``config.allow_internal_format`` lets operators keep tensors in
    the NPU's private layouts (NC1HWC0, FRACTAL_Z); its default is per chip too (off on A3) and torch_npu has no
    getter for it. ``conv.allow_hf32`` / ``matmul.allow_hf32``, the NPU's TF32, default to True / False.
    CUDA: ``torch.backends.cudnn.allow_tf32`` / ``torch.backends.cuda.matmul.allow_tf32`` default to True / False,
    the same split. --tf32 sets both pairs: one switch, so that NPU and GPU runs compare like for like.
    """
    if kind == "npu":
        described = _apply_npu_settings(args)
    elif kind == "cuda":
        if args.tf32 != "auto":
            torch.backends.cudnn.allow_tf32 = SWITCHES[args.tf32]
            torch.backends.cuda.matmul.allow_tf32 = SWITCHES[args.tf32]
        tf32_default = _by_default(args.tf32, "PyTorch's default")
        described = (f"TF32 convolutions {_on_off(torch.backends.cudnn.allow_tf32)}, TF32 matmuls "
                     f"{_on_off(torch.backends.cuda.matmul.allow_tf32)}{tf32_default}, "
                     f"cuDNN autotuning {_on_off(torch.backends.cudnn.benchmark)}")
    else:
        described = "none apply on the CPU"
    if args.deterministic:
        described += ", " + _use_deterministic_algorithms(kind)
    other_kinds = (NPU_SETTINGS if kind != "npu" else ()) + (("tf32",) if kind == "cpu" else ())
    ignored = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in other_kinds
               if getattr(args, name) != "auto"]
    if ignored:
        described += f" ({', '.join(ignored)}: not for {kind} runs, ignored)"
    return described


def _apply_npu_settings(args):
    npu = torch.npu
    if args.npu_jit_compile != "auto":
        npu.set_compile_mode(jit_compile=SWITCHES[args.npu_jit_compile])
    if args.npu_internal_format != "auto":
        npu.config.allow_internal_format = SWITCHES[args.npu_internal_format]
    if args.tf32 != "auto":
        npu.conv.allow_hf32 = SWITCHES[args.tf32]
        npu.matmul.allow_hf32 = SWITCHES[args.tf32]
    chip_default = "torch_npu's default for this chip"
    kernels = "binary kernels" if npu.is_jit_compile_false() else "online-compiled kernels (jit_compile)"
    formats = chip_default if args.npu_internal_format == "auto" else args.npu_internal_format
    hf32_default = _by_default(args.tf32, "torch_npu's default")
    return (f"{kernels}{_by_default(args.npu_jit_compile, chip_default)}, internal formats {formats}, "
            f"HF32 convolutions {_on_off(npu.conv.allow_hf32)}, HF32 matmuls {_on_off(npu.matmul.allow_hf32)}"
            f"{hf32_default}")


def _use_deterministic_algorithms(kind):
    """--deterministic: kernels that give the same bits on every run. Operators without a deterministic kernel warn
    (warn_only) rather than stop a run. cuBLAS needs a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when its
    handle is made, i.e. after this), HCCL's reductions their own switch (HCCL_DETERMINISTIC, read at the process
    group's start); a variable the user set wins."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    if kind == "cuda":
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif kind == "npu":
        os.environ.setdefault("HCCL_DETERMINISTIC", "true")
    return "deterministic algorithms (--deterministic)"


def _on_off(flag):
    return "on" if flag else "off"


def _by_default(choice, default):
    """Says whose default a setting left at "auto" is."""
    return f" ({default})" if choice == "auto" else ""


@contextlib.contextmanager
def _signals_end_process():
    """SIGINT and SIGTERM end the process at once while it waits for its peers: the wait is in C++, where a Python
    handler never runs (a missing node would keep it there until --dist-timeout), and there is nothing to save."""
    previous = {signum: signal.signal(signum, signal.SIG_DFL) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


VISIBLE_DEVICES_VARIABLES = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}


def _given_its_own_device(kind):
    """Whether the launcher gave this process a device of its own: an srun task, or *_VISIBLE_DEVICES naming one
    device. Not so for several torchrun processes on a host with one device: binding all of them to it would only
    fail later, at the first collective, with a misleading message."""
    visible = os.environ.get(VISIBLE_DEVICES_VARIABLES[kind])
    return launched_by_slurm() or (visible is not None and len(visible.split(",")) == 1)


def _memory_format(choice, kind):
    # Ascend recommends contiguous NCHW tensors on NPU; channels_last is faster for these convolutions elsewhere.
    if choice == "auto":
        choice = "contiguous" if kind == "npu" else "channels_last"
    return torch.channels_last if choice == "channels_last" else torch.contiguous_format


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


# How each backend reports a collective that failed because a peer died or hung:
#  - NCCL, HCCL's asynchronous errors and watchdog timeouts, and the stores raise dist.DistError subclasses
#    (DistBackendError, DistNetworkError, DistStoreError; torch's c10d/NCCLUtils.hpp, torch_npu's libtorch_npu.so);
#  - gloo (torch 2.14) raises a plain RuntimeError that starts with its source location: "[.../gloo/transport/tcp/
#    pair.cc:545] Read error ...: Connection reset by peer" (a dead peer), "[.../gloo/transport/tcp/
#    unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete" (a hung one);
#  - a failing HCCL call raises a plain RuntimeError, "... HCCL function error: ..., error code is N" with the
#    code ERR02200 DIST ("call hccl api failed"; torch_npu's csrc/distributed/HCCLUtils.hpp, HCCL_CHECK_ERROR),
#    or torch.OutOfMemoryError when HCCL ran out of device memory, which is no peer's fault.
_GLOO_FAILURE = re.compile(r"^\[[^\]]*\bgloo/[^\]]*\]")
_HCCL_FAILURE = re.compile(r"HCCL function error|\bERR02200 DIST\b")


def collective_failure(exc, timeout):
    """A one-line explanation when ``exc`` is a failed collective of a multi-process run, else None (any other
    error, an out-of-memory or shape error among them, keeps its own message and traceback).

    A rank that died breaks its peers' connections at once; one that hangs makes their collectives time out.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    message = str(exc).strip()
    if isinstance(exc, torch.OutOfMemoryError) or not (
            isinstance(exc, dist.DistError)
            or isinstance(exc, RuntimeError) and (_GLOO_FAILURE.match(message) or _HCCL_FAILURE.search(message))):
        return None
    # Backend messages start with the source location, e.g. "[.../gloo/transport/tcp/pair.cc:545] ".
    cause = re.sub(r"^\[[^\]]*\]\s*", "", message.splitlines()[0] if message else repr(exc))
    return (f"rank {dist.get_rank()} of {dist.get_world_size()}: a collective operation failed ({cause}); another "
            f"process probably died or hung (collectives time out after --dist-timeout {timeout} s): see its log")


def cleanup():
    if dist.is_available() and dist.is_initialized():
        # torch 2.6 and 2.7 free the process group holding the GIL (2.8 releases it: pytorch/pytorch#154976), and
        # gloo's destructor waits for its worker threads; one still freeing the last collective's tensors needs the
        # GIL: a deadlock (seen at the end of CPU evaluations). Holding gloo's backend moves its freeing to our
        # `del`, which torch binds to release the GIL (unless a DDP wrapper still holds the group: after an error).
        gloo = dist.group.WORLD._get_backend(torch.device("cpu")) if dist.get_backend() == "gloo" else None
        dist.destroy_process_group()
        del gloo


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


def build_optimizer(kind, params, args):
    """SGD or the paper's TensorFlow-style RMSProp; SGD on NPU with apex is Ascend's fused SGD, which works on
    apex's combined gradient buffers."""
    if args.opt == "rmsprop":
        return recipe.RMSpropTF(params, lr=args.lr, decay=args.rmsprop_decay, momentum=args.momentum,
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
