"""How a process finds its device, its peers and its share of the CPUs (distributed.py's runtime setup, main.py's
defaults, the launchers' NPU environment): a torch_npu that cannot load, rendezvous mistakes, one visible device
per process, CPUs per node, and which errors count as a failed collective."""
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
from helpers import BROKEN_NPU_SITE, ONE_STEP
from helpers import ROOT, clean_env, device_args, expect_error, run_main_subprocess, tiny_flags
from training import distributed
from training.utils import UserError


# --- a torch_npu that cannot load (CANN's set_env.sh not sourced) ---

def test_cpu_run_does_not_depend_on_an_installed_torch_npu(tmp_path):
    result = run_main_subprocess(*ONE_STEP, "--device", "cpu", "--output-dir", str(tmp_path),
                                 env=clean_env(PYTHONPATH=BROKEN_NPU_SITE))
    assert result.returncode == 0, result.stderr
    assert "torch_npu" not in result.stderr and "libhccl" not in result.stderr


def test_device_auto_falls_back_to_the_cpu_in_one_line(tmp_path):
    result = run_main_subprocess(*ONE_STEP, "--device", "auto", "--output-dir", str(tmp_path),
                                 env=clean_env(PYTHONPATH=BROKEN_NPU_SITE))
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "torch_npu" in line]
    assert len(said) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "libhccl.so" in said[0] and "running on cpu" in said[0] and "set_env.sh" in said[0]
    assert "1 x cpu" in (tmp_path / "train.log").read_text()


def test_device_npu_without_cann_is_one_line_naming_set_env(tmp_path):
    result = run_main_subprocess(*ONE_STEP, "--device", "npu", "--output-dir", str(tmp_path),
                                 env=clean_env(PYTHONPATH=BROKEN_NPU_SITE))
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: --device npu:") and "libhccl.so" in err and "set_env.sh" in err


def test_spawned_workers_import_torch_npu_themselves(tmp_path):
    """With autoloading off, the launcher imports torch_npu to check the device, and each spawned worker (a fresh
    interpreter) must import it again before it binds its NPU. The stand-in loads where ASCEND_HOME_PATH is set
    and logs its imports and set_device calls; it has no kernels, so the run fails after that, which is expected."""
    log = tmp_path / "npu.log"
    result = run_main_subprocess(*ONE_STEP, "--device", "npu", "--multiprocessing-distributed",
                                 "--output-dir", str(tmp_path),
                                 env=clean_env(PYTHONPATH=BROKEN_NPU_SITE, ASCEND_HOME_PATH=str(tmp_path),
                                               FAKE_NPU_LOG=str(log), TORCH_DEVICE_BACKEND_AUTOLOAD="0"))
    lines = log.read_text().splitlines() if log.exists() else []
    imported = {line.split()[1] for line in lines if line.startswith("import ")}
    bound = [line.split()[1:] for line in lines if line.startswith("set_device ")]
    assert len(imported) == 2, (lines, result.stderr)  # the launcher and its one worker
    assert len(bound) == 1 and bound[0][0] == "0" and bound[0][1] in imported, (lines, result.stderr)


def launcher_env(tmp_path, **extra):
    return {**clean_env(PYTHONPATH=BROKEN_NPU_SITE, PYTHON=sys.executable, HOME=str(tmp_path)), **extra}


def test_launchers_run_next_to_a_torch_npu_that_cannot_load(tmp_path):
    """--device=auto: the launcher's own probe and main.py both fall back to the CPU; torchrun (which imports torch
    before main.py) with --device=cpu."""
    tiny = ["--", "--arch", "mnasnet0_5", "--train-crop-size", "48", "--dummy-images", "32"]
    for script, options, case in (
            ("train_performance_1p.sh", ["--device=auto"], "bs8_1p_perf"),
            ("train_performance_8p.sh", ["--device=cpu", "--num_devices=2", "--launcher=torchrun"], "bs8_2p_perf")):
        result = subprocess.run(["bash", os.path.join(ROOT, "test", script), *options, "--batch_size=8",
                                 "--steps=5", "--workers=0", f"--output_root={tmp_path / script}", *tiny],
                                cwd=ROOT, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        report = (tmp_path / script / "0" / f"MnasNet_for_PyTorch_{case}.log").read_text()
        assert "Device = cpu" in report, report


# --- test/env_npu.sh: where CANN is ---

def source_env_npu(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND", "MNASNET_", "TORCH_DEVICE_BACKEND"))}
    env.update(HOME=str(tmp_path), **extra)
    return subprocess.run(["bash", "-c", "source test/env_npu.sh; echo \"sourced=${CANN_SOURCED:-no} "
                           "autoload=${TORCH_DEVICE_BACKEND_AUTOLOAD:-unset}\""],
                          cwd=ROOT, env=env, capture_output=True, text=True)


def fake_cann(root):
    """CANN 8.5+'s layout: <install path>/cann/set_env.sh, which exports ASCEND_HOME_PATH."""
    cann = root / "Ascend" / "cann"
    cann.mkdir(parents=True)
    (cann / "set_env.sh").write_text(f"export ASCEND_HOME_PATH={cann}\nexport CANN_SOURCED=yes\n")
    return cann


def test_env_npu_finds_the_cann_8_5_layout(tmp_path):
    fake_cann(tmp_path)  # ~/Ascend/cann: a non-root user's default install path
    result = source_env_npu(tmp_path)
    assert result.returncode == 0 and "CANN not found" not in result.stderr, result.stderr
    assert result.stdout.split() == ["sourced=yes", "autoload=unset"]


def test_env_npu_with_ascend_home_path_set_sources_nothing_again(tmp_path):
    cann = tmp_path / "elsewhere" / "cann"
    cann.mkdir(parents=True)  # set_env.sh already sourced: ASCEND_HOME_PATH names the install, no set_env.sh found
    result = source_env_npu(tmp_path, ASCEND_HOME_PATH=str(cann))
    assert result.returncode == 0 and "CANN not found" not in result.stderr, result.stderr
    assert result.stdout.split() == ["sourced=no", "autoload=unset"]


def test_env_npu_without_cann_turns_torch_npu_autoloading_off(tmp_path):
    result = source_env_npu(tmp_path)
    assert "CANN not found" in result.stderr
    assert result.stdout.split() == ["sourced=no", "autoload=0"]


def test_env_npu_sourced_under_set_e_survives_msnpureport_failing(tmp_path):
    """msnpureport fails for a device id the host lacks (fewer than 8 NPUs); tools/device_check.sh sources
    env_npu.sh under `set -e`, which that failure must not end."""
    cann = fake_cann(tmp_path)
    bin_dir = cann / "bin"
    bin_dir.mkdir()
    (bin_dir / "msnpureport").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "msnpureport").chmod(0o755)
    with open(cann / "set_env.sh", "a") as handle:
        handle.write(f"export PATH={bin_dir}:$PATH\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND", "TORCH_DEVICE_BACKEND"))}
    result = subprocess.run(["bash", "tools/device_check.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**env, "HOME": str(tmp_path), "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


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


@pytest.mark.parametrize("script", ["classify.py", "export_onnx.py", "bench.py", "tools/onnx_to_om.py",
                                    "tools/device_check.py"])
def test_other_entry_points_start_next_to_a_torch_npu_that_cannot_load(script):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT, text=True,
                            capture_output=True, timeout=120, env=clean_env(PYTHONPATH=BROKEN_NPU_SITE))
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
