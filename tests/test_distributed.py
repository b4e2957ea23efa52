"""The rendezvous under SLURM and torchrun: the port of a job, and waits bounded by --dist-timeout (gloo, CPU)."""
import argparse
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, clean_env, tiny_flags
from training import distributed


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
