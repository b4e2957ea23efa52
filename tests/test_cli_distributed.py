"""main.py as several processes on one machine (2 gloo processes): --multiprocessing-distributed, two torchrun
nodes (and one whose peer never comes), srun's tasks, and what happens when a rank is stopped, dies or hangs."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import (LAUNCHER_VARIABLES, ROOT, clean_env, expect_error, logged_digest, popen_main, run_main_in_process,
                     run_main_subprocess, tiny_flags, wait_for_text)
from training import checkpoint, distributed
from training.utils import state_digest


def test_two_gloo_processes_train_and_count_each_val_image_once(image_folder, tmp_path):
    """Also: rank 0 lists the folder once for both ranks (rank 1 and a later -e run in the folder read its listing),
    and --save-every-minutes saves mid-epoch at the same steps on both ranks (ranks > 0 log rank 0's path)."""
    out = tmp_path / "ddp"
    summary_path = tmp_path / "ddp.json"
    proc = run_main_subprocess(image_folder, *tiny_flags(out, "--epochs", "2", "--seed", "0", "--print-freq", "1",
                                                         "--save-every-minutes", "0.0001",
                                                         "--multiprocessing-distributed", "--device-list", "0,1",
                                                         "--summary-json", str(summary_path)))
    assert proc.returncode == 0, proc.stderr
    position = r"saved \S+ at epoch (\d+), step (\d+)/(\d+)"
    rank0 = re.findall(rf"=> {position}", (out / "train.log").read_text())
    rank1 = re.findall(rf"=> rank 0 {position}", (out / "rank1.log").read_text())
    # 18 images a rank in batches of 4: 4 steps; the epoch's own save follows the last.
    assert rank0 == rank1 == [(epoch, step, "4") for epoch in "01" for step in "123"]
    rank0, rank1 = (out / "train.log").read_text(), (out / "rank1.log").read_text()
    for split in ("train", "val"):
        assert re.search(rf"=> {re.escape(os.path.join(image_folder, split))}: \d+ images listed in ", rank0), rank0
        assert f"{os.path.join(image_folder, split)}: " in rank1
    assert rank1.count("read from the listing cache") == 2 and " listed in " not in rank1
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == 2
    assert summary["val_images"] == 15  # 15 images over 2 ranks: no padding, no drop
    log = (out / "train.log").read_text()
    assert "Epoch: [1]" in log
    assert (out / "rank1.log").exists()
    # A single process scoring the saved weights gets what the two ranks did together: the same accuracy and, to
    # float rounding (1e-7 measured), the same loss; with each rank's own BatchNorm statistics, rank 1's half
    # would score other weights.
    single = run_main_in_process(image_folder, *tiny_flags(out, "--evaluate", "--resume",
                                                           str(out / "checkpoint.pth.tar")))
    assert (out / "train.log").read_text().count("read from the listing cache") == 1  # val/'s
    assert single["val_acc1"] == pytest.approx(summary["val_acc1"])
    assert single["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert single["val_images"] == 15
    # Both ranks ended with the weights that were saved.
    saved = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    digest = state_digest(saved["state_dict"])
    assert summary["weights_sha256"] == digest
    assert f"=> rank 1 weights sha256 {digest}" in (out / "rank1.log").read_text()


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


def check_same_weights(tmp_path, val_images):
    """Node 0 ran rank 0 (train.log, checkpoint, summary), node 1 ran rank 1 (rank1.log, nothing else)."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["val_images"] == val_images
    saved = torch.load(node0 / checkpoint.CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    digest = state_digest(saved["state_dict"])
    assert summary["weights_sha256"] == digest == logged_digest(node0 / "train.log", 0)
    assert logged_digest(node1 / "rank1.log", 1) == digest
    assert not (node1 / checkpoint.CHECKPOINT_NAME).exists()


def node_flags(tmp_path, node, *extra):
    return tiny_flags(tmp_path / f"node{node}", "--epochs", "2", "--max-steps", "2", "--seed", "0",
                      "--summary-json", str(tmp_path / "summary.json"), *extra)


def test_two_torchrun_nodes_end_with_the_same_weights(image_folder, tmp_path):
    port = str(distributed.free_port())
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                 "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                 os.path.join(ROOT, "main.py"), image_folder, *node_flags(tmp_path, node)] for node in range(2)]
    run_together(commands, [clean_env()] * 2)
    check_same_weights(tmp_path, val_images=15)  # one validation split across the two nodes


def test_srun_tasks_form_one_job(image_folder, tmp_path):
    """What srun -N 2 --ntasks-per-node 1 sets for each task; MASTER_ADDR/PORT come from the job script. Without
    validation too, the ranks take rank 0's BatchNorm statistics at the end of each epoch: equal digests."""
    port = str(distributed.free_port())
    commands = [[sys.executable, os.path.join(ROOT, "main.py"), image_folder, *node_flags(tmp_path, node, "--no-val")]
                for node in range(2)]
    envs = [clean_env(SLURM_PROCID=str(node), SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for node in range(2)]
    run_together(commands, envs)
    check_same_weights(tmp_path, val_images=None)


def test_srun_without_master_address_is_one_line(image_folder, tmp_path, capsys, monkeypatch):
    for name, value in clean_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0",
                                 SLURM_STEP_NUM_TASKS="2").items():
        monkeypatch.setenv(name, value)
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    expect_error(capsys, [image_folder, *tiny_flags(tmp_path)], "MASTER_ADDR and MASTER_PORT not set", "--dist-url")


def test_sigterm_to_a_two_process_run_saves_once_and_all_exit(image_folder, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # One loader worker per rank: the workers ignore the signal, and must still end with their rank.
    proc = popen_main(image_folder, *tiny_flags(tmp_path, "--epochs", "50", "--print-freq", "1", "-j", "1",
                                            "--multiprocessing-distributed", "--device-list", "0,1"), env=env)
    wait_for_text(tmp_path / "train.log", "Epoch: [0][2/4]", proc)
    proc.send_signal(signal.SIGTERM)  # the launcher alone, as a scheduler might
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "=> stopped by SIGTERM" in (tmp_path / "train.log").read_text()
    state = checkpoint.load_file(str(tmp_path / "checkpoint.pth.tar"))
    assert len(state["rng"]) == 2
    # Rank 1 says what rank 0 saved.
    path = tmp_path / "checkpoint.pth.tar"
    assert f"checkpoint {path}; resume with --resume {path}" in (tmp_path / "rank1.log").read_text()


# --- distributed ---

@pytest.mark.parametrize("fault, workers", [("dies", "0"), ("dies", "1"), ("hangs", "0")])
def test_a_dead_or_hung_rank_makes_the_other_exit_with_a_clear_error(image_folder, tmp_path, fault, workers):
    """A rank killed with SIGKILL: the kernel closes its connections and the survivor's next collective fails, well
    within --dist-timeout 60. With loader workers the connections close only when the workers, forked from the rank
    and holding copies of its sockets, notice their parent is gone: PyTorch's workers look every 5 s. A hung rank
    (SIGSTOP) keeps its connections open: the survivor waits --dist-timeout (5 s here)."""
    timeout = "60" if fault == "dies" else "5"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [popen_main(image_folder, *tiny_flags(tmp_path, "--epochs", "50", "--dist-timeout", timeout, "-j", workers),
                        env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))) for rank in range(2)]
    try:
        wait_for_text(tmp_path / "rank1.log", "Epoch: [1]", procs[1])
        os.kill(procs[1].pid, signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        stopped = time.monotonic()
        # The limit only tells a hang (50 epochs are minutes).
        out, err = procs[0].communicate(timeout=180)
        seconds = time.monotonic() - stopped
    finally:
        procs[1].kill()
        procs[1].communicate()
    print(f"{fault}, -j {workers}: rank 0 exited {seconds:.1f} s after rank 1 stopped (--dist-timeout {timeout})")
    assert procs[0].returncode == 1
    assert "error: rank 0 of 2: a collective operation failed" in err and "Traceback" not in err
    assert f"--dist-timeout {timeout} s" in err and len(err.strip().splitlines()) == 1, err
    if fault == "dies":
        # Generous bounds for a busy machine, still far below the timeout: 1-2 s without workers, 5-7 s with.
        assert seconds < (15 if workers == "0" else 30), seconds


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
