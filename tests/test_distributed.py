"""training/distributed.py: launcher detection, rendezvous mistakes, one visible device per process, CPUs per
node, a SIGTERM at the rendezvous, which errors count as a failed collective, the port of a SLURM job, and
rendezvous waits bounded by --dist-timeout."""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import main
from helpers import ONE_STEP, ROOT, clean_env, device_args, expect_error, tiny_flags
from training import distributed
from training.utils import UserError

# --- the rendezvous ---

def refuse_to_start(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("processes were started")
    monkeypatch.setattr(distributed.mp, "start_processes", fail)
    monkeypatch.setattr(main, "train", fail)


def test_several_nodes_without_a_rendezvous_address_is_one_line(image_folder, tmp_path, capsys, no_launcher):
    """The local 127.0.0.1 default is for one node: each node would pick its own and wait for the others."""
    refuse_to_start(no_launcher)
    no_launcher.setenv("MASTER_PORT", "29500")
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, "--multiprocessing-distributed", "--world-size", "2")],
                 "--world-size 2", "MASTER_ADDR not set", "--dist-url tcp://")


@pytest.mark.parametrize("flags", [["--world-size", "2", "--rank", "1"], ["--dist-url", "tcp://127.0.0.1:29500"]])
def test_node_flags_without_multiprocessing_distributed_are_one_line(image_folder, tmp_path, capsys, no_launcher,
                                                                      flags):
    refuse_to_start(no_launcher)
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path, *flags)], "add --multiprocessing-distributed")


def live_processes_in_session(session, grace=10):
    """The processes of a session still running after ``grace`` seconds (exited ones may linger as zombies)."""
    deadline = time.time() + grace
    while True:
        listing = subprocess.run(["ps", "-o", "stat=,pid=", "-s", str(session)], capture_output=True, text=True)
        live = [line.split()[1] for line in listing.stdout.splitlines() if not line.startswith("Z")]
        if not live or time.time() > deadline:
            return live
        time.sleep(0.5)


def test_sigterm_ends_a_run_waiting_at_the_rendezvous(tmp_path):
    """Node 0 of 2; node 1 never comes. SIGTERM to the launcher (a scheduler's pre-emption) ends it and its worker
    at once, not after --dist-timeout."""
    port = distributed.free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *ONE_STEP, "--device", "cpu",
                             "--multiprocessing-distributed", "--world-size", "2", "--rank", "0",
                             "--dist-url", f"tcp://127.0.0.1:{port}", "--dist-timeout", "600",
                             "--output-dir", str(tmp_path)],
                            cwd=ROOT, env=clean_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        start = time.time()
        while True:  # rank 0 listens on the port once it waits in init_process_group
            assert proc.poll() is None, proc.communicate()
            assert time.time() - start < 120, "rank 0 never reached the rendezvous"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM
        assert live_processes_in_session(proc.pid) == [], "a worker outlived the launcher"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


# --- one visible device per process ---

@pytest.fixture
def cuda_standin(monkeypatch, kernel_flags):
    """torch.cuda as a process with CUDA_VISIBLE_DEVICES set per process sees it; records set_device. setup_runtime
    turns cuDNN autotuning on: kernel_flags puts it back."""
    bound = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)

    def visible(count):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        return bound
    return visible


def test_one_visible_device_is_used_by_any_local_rank(cuda_standin, no_launcher):
    bound = cuda_standin(1)  # CUDA_VISIBLE_DEVICES=5 for this process: local rank 1 sees its own GPU, as device 0
    no_launcher.setenv("CUDA_VISIBLE_DEVICES", "5")
    runtime = distributed.setup_runtime(device_args(), local_rank=1)
    assert runtime.device == torch.device("cuda", 0) and bound == [torch.device("cuda", 0)]


def test_several_processes_on_a_host_with_one_device_is_an_error(cuda_standin, no_launcher):
    """Not every rank bound to the one device, which fails only at the first collective, misleadingly."""
    cuda_standin(1)
    no_launcher.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UserError, match="local rank 1 has no device"):
        distributed.setup_runtime(device_args(), local_rank=1)


def test_several_visible_devices_are_shared_out_by_local_rank(cuda_standin, no_launcher):
    bound = cuda_standin(4)
    runtime = distributed.setup_runtime(device_args(device_ids=[2, 3]), local_rank=1)
    assert runtime.device == torch.device("cuda", 3) and bound == [torch.device("cuda", 3)]
    with pytest.raises(UserError, match="local rank 2 has no device"):
        distributed.setup_runtime(device_args(device_ids=[2, 3]), local_rank=2)


# --- CPUs per process ---

@pytest.mark.parametrize("variables, args, workers", [
    # torchrun, 2 nodes of 4 processes: 16 CPUs / 4 on this node, not / 8 in the job.
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, {}, 3),
    # srun, 3 tasks on node 0 and 1 on node 1: this is node 1.
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "4",
      "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1"}, {}, 15),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_STEP_NUM_TASKS": "8",
      "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "0"}, {}, 3),
    # srun --cpus-per-task 6, with each task bound to its own CPUs or not.
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_STEP_NUM_TASKS": "8",
      "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "6"}, {}, 5),
    # --multiprocessing-distributed on 2 nodes, 2 devices each.
    ({}, {"multiprocessing_distributed": True, "world_size": 2, "device_ids": [0, 1]}, 7),
])
def test_loader_workers_share_this_nodes_cpus(no_launcher, variables, args, workers):
    for name, value in {**variables, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        no_launcher.setenv(name, value)
    no_launcher.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    no_launcher.setattr(dist, "init_process_group", lambda *a, **k: None)  # this test is about the CPUs
    runtime = distributed.setup_runtime(device_args(device_kind="cpu", **args), local_rank=1)
    assert runtime.world_size > 1
    assert main.default_workers(runtime) == workers


def test_cpus_follow_the_affinity_mask(no_launcher):
    no_launcher.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    runtime = distributed.setup_runtime(device_args(device_kind="cpu"), local_rank=0)
    assert main.default_workers(runtime) == 4


# --- which errors are a failed collective ---

@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)


@pytest.mark.parametrize("exc", [
    # gloo in torch 2.14, measured: a dead peer, a hung one.
    RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                 "[127.0.0.1]:8325: Connection reset by peer. This is typically caused by a remote worker hanging"),
    RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                 "waiting 4000ms for recv operation to complete"),
    # NCCL and HCCL's asynchronous errors: DistBackendError.
    dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:2112, remote process exited or there was a network "
                          "error, NCCL version 2.27.5"),
    dist.DistNetworkError("Connection reset by peer"),
    # A failing HCCL call (HCCLUtils.hpp, HCCL_CHECK_ERROR).
    RuntimeError("HcclAllReduce:torch_npu/csrc/distributed/ProcessGroupHCCL.cpp:3780 HCCL function error: "
                 "HcclAllReduce(...), error code is 7\n[ERROR] 2026-11-29-10:00:00 (PID:1, Device:0, RankID:1) "
                 "ERR02200 DIST call hccl api failed."),
])
def test_collective_failures_are_one_line(two_ranks, exc):
    message = distributed.collective_failure(exc, 1800)
    assert message.startswith("rank 1 of 2: a collective operation failed (") and "\n" not in message
    assert "/gloo/" not in message


@pytest.mark.parametrize("exc", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x1280 and 1000x10)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    torch.OutOfMemoryError("HcclAllReduce:ProcessGroupHCCL.cpp:3780 HCCL function error: ..., error code is 4"),
    RuntimeError("Expected to have finished reduction in the prior iteration before starting a new one."),
    ValueError("not a RuntimeError"),
])
def test_other_errors_keep_their_own_message(two_ranks, exc):
    assert distributed.collective_failure(exc, 1800) is None


@pytest.mark.parametrize("variables, expected", [
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8"}, (3, 8, 1)),
    # An sbatch script's own shell: SLURM_PROCID and SLURM_NTASKS are set, but it is one process, not a step.
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}, None),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "1"}, None),
    # torchrun started by srun (one task per node): torchrun's ranks win.
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2",
      "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}, (9, 16, 1)),
])
def test_launcher_ranks(no_launcher, variables, expected):
    for name, value in variables.items():
        no_launcher.setenv(name, value)
    assert distributed.launcher_ranks() == expected


# --- the rendezvous: the port of a SLURM job, waits bounded by --dist-timeout ---

def srun_variables(rank):
    """What srun -n 2 sets for task ``rank`` (besides SLURM_JOB_ID)."""
    return dict(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2")


def test_a_rank_that_meets_a_listener_that_never_answers_exits_after_dist_timeout(image_folder, tmp_path):
    """Another job's process holds the port: it accepts the connection (the kernel does, from the listen backlog)
    and never answers torch's handshake. Rank 1 stops with one line naming the address and the timeout."""
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen(8)
        port = foreign.getsockname()[1]
        env = clean_env(**srun_variables(1), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        start = time.monotonic()
        try:
            # Generous: the wait is 5 s, the rest is starting Python and importing torch on a busy machine.
            result = subprocess.run([sys.executable, str(ROOT / "main.py"), image_folder,
                                     *tiny_flags(tmp_path, "--dist-timeout", "5")],
                                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 1 still waited for the foreign listener after 90 s with --dist-timeout 5")
        seconds = time.monotonic() - start
    print(f"rank 1 gave up after {seconds:.1f} s (--dist-timeout 5)")
    err = result.stderr.strip()
    assert result.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: rank 1 of 2"), err
    assert f"127.0.0.1:{port}" in err and "--dist-timeout 5 s" in err, err


@pytest.mark.parametrize("job_id, port", [("1", 10001), ("19999", 29999), ("20000", 10000), ("4242424", 12424)])
def test_the_port_of_a_slurm_job(job_id, port):
    assert distributed.slurm_job_port(job_id) == port


def test_srun_tasks_without_master_port_meet_at_the_port_of_their_job(no_launcher):
    for name, value in dict(srun_variables(0), SLURM_JOB_ID="4242424", MASTER_ADDR="head-node").items():
        no_launcher.setenv(name, value)
    args = argparse.Namespace(dist_url="env://")
    assert distributed.rendezvous_url(args) == "tcp://head-node:12424"
    no_launcher.setenv("MASTER_PORT", "29500")  # an exported port wins
    assert distributed.rendezvous_url(args) == "env://"
