"""One process per device: launching them (spawn, torchrun, SLURM), the process group (HCCL, NCCL, gloo), the
``Runtime`` a process trains with, its signals and CPU share, and what a failed collective means."""
import contextlib
import datetime
import inspect
import os
import re
import signal
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from training import devices
from training.utils import STOP_SIGNALS, UserError, first_line

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


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


def free_port():
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
            os.environ.setdefault("MASTER_PORT", str(free_port()))
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
            devices.device_module(self.kind).synchronize(self.device)

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

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (a collective): what rank 0 alone decided or did."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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
        return devices.device_module(self.kind).max_memory_allocated(self.device) if self.kind != "cpu" else None


def setup_runtime(args, local_rank):
    """Bind this process to its device and join the process group (a no-op for one process)."""
    kind = args.device_kind
    if kind == "npu" and not devices.import_torch_npu():
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
        if devices.device_count(kind) == 1 and _given_its_own_device(kind):
            # This process sees one device, its own (srun --gpus-per-task=1, *_VISIBLE_DEVICES set per process).
            index = 0
        elif local_rank < len(ids):
            index = ids[local_rank]
        else:
            raise UserError(f"local rank {local_rank} has no device: --device-list names only {ids}")
        device = torch.device(kind, index)
        devices.device_module(kind).set_device(device)
        # Every step's batch has the same shape: cuDNN times its convolution algorithms once and keeps the fastest
        # (which may differ between runs: not with --deterministic).
        torch.backends.cudnn.benchmark = kind == "cuda" and not args.deterministic
    kernel_settings = devices.apply_kernel_settings(kind, args)

    if world_size > 1:
        backend = args.dist_backend or BACKENDS[kind]
        init_method = rendezvous_url(args)
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if init_method == "env://" and missing:
            raise UserError(f"{' and '.join(missing)} not set: export MASTER_ADDR (e.g. the first host of "
                            "$SLURM_JOB_NODELIST) and MASTER_PORT on every node, or give --dist-url tcp://HOST:PORT")
        with _signals_end_process():
            join_process_group(backend, init_method, world_size, rank, args.dist_timeout, device)
    return Runtime(kind, device, rank, world_size, local_rank, devices.memory_format(args.memory_format, kind),
                   local_world_size=processes_on_this_node(args), kernel_settings=kernel_settings)


def slurm_job_port(job_id):
    """The rendezvous port of SLURM job ``job_id`` when its script exports no MASTER_PORT: a port per job, so that two
    jobs sharing a node never meet. From 10000-29999: below the ephemeral ports (Linux: 32768 and up) that outgoing
    connections take."""
    return 10000 + int(job_id) % 20000


def rendezvous_url(args):
    """Where this process meets the others: torchrun's env://, --dist-url, or for srun tasks given MASTER_ADDR but no
    MASTER_PORT, their job's port on MASTER_ADDR."""
    if launched_by_torchrun():
        return "env://"
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if (args.dist_url == "env://" and launched_by_slurm() and job_id.isdigit() and "MASTER_ADDR" in os.environ
            and "MASTER_PORT" not in os.environ):
        host = os.environ["MASTER_ADDR"]
        return f"tcp://{f'[{host}]' if ':' in host else host}:{slurm_job_port(job_id)}"
    return args.dist_url


def _rendezvous_address(init_method):
    if init_method == "env://":
        return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    return init_method.split("://", 1)[-1]


def join_process_group(backend, init_method, world_size, rank, timeout, device):
    """init_process_group, given up after ``timeout`` seconds (--dist-timeout) with a one-line error.

    torch's own timeout bounds the store's waits and the collectives, not the handshake of a new store client: one
    that reaches a listener that never answers (another job's process on the port) waits in a read with no time
    limit, and one that reaches another job's store waits on that job's processes (gloo, torch 2.14: five times the
    timeout). So a helper thread joins, bound to this process's device as this thread is, and this thread waits for
    it at most ``timeout`` seconds."""
    outcome = {}

    def join():
        try:
            if device.type != "cpu":
                devices.device_module(device.type).set_device(device)
            dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                                    timeout=datetime.timedelta(seconds=timeout))
        except Exception as exc:
            outcome["error"] = exc

    joining = threading.Thread(target=join, name="rendezvous", daemon=True)
    joining.start()
    joining.join(timeout)
    address = _rendezvous_address(init_method)
    if joining.is_alive():
        # The thread stays blocked; the process exits with this error, and the thread with it.
        raise UserError(f"rank {rank} of {world_size} waited --dist-timeout {timeout} s for the others at {address} "
                        "in vain: a node that never came, or another job's process on that port (give each job its "
                        "own MASTER_PORT)")
    error = outcome.get("error")
    if isinstance(error, (RuntimeError, ValueError)):  # dist.DistError is a RuntimeError
        raise UserError(f"rank {rank} of {world_size} could not join the others at {address}: "
                        f"{first_line(error)}") from None
    if error is not None:
        raise error


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
