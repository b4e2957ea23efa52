"""Jobs beyond one node, on one machine: two torchrun agents on loopback, and srun's environment (gloo, CPU)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from helpers import LAUNCHER_VARIABLES, ROOT, clean_env, expect_error, logged_digest, tiny_flags
from training import checkpoint, distributed
from training.utils import state_digest


def run_together(commands, envs):
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in zip(commands, envs)]
    try:
        results = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, f"{out}\n{err}"


def check_same_weights(tmp_path):
    """Node 0 ran rank 0 (train.log, checkpoint, summary), node 1 ran rank 1 (rank1.log, nothing else)."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["val_images"] == 15  # one validation split across the two nodes
    saved = torch.load(node0 / checkpoint.CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    digest = state_digest(saved["state_dict"])
    assert summary["weights_sha256"] == digest == logged_digest(node0 / "train.log", 0)
    assert logged_digest(node1 / "rank1.log", 1) == digest
    assert not (node1 / checkpoint.CHECKPOINT_NAME).exists()


def node_flags(tmp_path, node):
    return tiny_flags(tmp_path / f"node{node}", "--epochs", "2", "--max-steps", "2", "--seed", "0",
                      "--summary-json", str(tmp_path / "summary.json"))


def test_two_torchrun_nodes_end_with_the_same_weights(image_folder, tmp_path):
    port = str(distributed.free_port())
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                 "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                 os.path.join(ROOT, "main.py"), image_folder, *node_flags(tmp_path, node)] for node in range(2)]
    run_together(commands, [clean_env()] * 2)
    check_same_weights(tmp_path)


def test_srun_tasks_form_one_job(image_folder, tmp_path):
    """What srun -N 2 --ntasks-per-node 1 sets for each task; MASTER_ADDR/PORT come from the job script."""
    port = str(distributed.free_port())
    commands = [[sys.executable, os.path.join(ROOT, "main.py"), image_folder, *node_flags(tmp_path, node)]
                for node in range(2)]
    envs = [clean_env(SLURM_PROCID=str(node), SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for node in range(2)]
    run_together(commands, envs)
    check_same_weights(tmp_path)


def test_srun_without_master_address_is_one_line(image_folder, tmp_path, capsys, monkeypatch):
    for name, value in clean_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0",
                                 SLURM_STEP_NUM_TASKS="2").items():
        monkeypatch.setenv(name, value)
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path)], "MASTER_ADDR and MASTER_PORT not set", "--dist-url")


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


def test_a_torchrun_node_whose_peer_never_comes_stops_after_the_rdzv_conf_timeout(tmp_path):
    """devices.md's torchrun command: node 0 of 2 alone. Its rendezvous ends after --rdzv-conf's 3 s (torchrun's own
    default is 600 s), before main.py starts."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "0",
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(distributed.free_port()),
               "--rdzv-conf", "timeout=3,join_timeout=3", os.path.join(ROOT, "main.py"), "--dummy",
               "--output-dir", str(tmp_path)]
    start = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    print(f"torchrun gave up after {seconds:.1f} s (--rdzv-conf timeout=3), torch's import included")
    assert result.returncode != 0 and "1/2 clients joined" in result.stderr, result.stderr[-2000:]
    assert seconds < 60  # generous: a busy machine's torch import; far below the 600 s of the default
    assert not (tmp_path / "train.log").exists()  # main.py never ran
