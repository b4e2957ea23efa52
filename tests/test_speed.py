"""Speed options give the results of the plain paths: torch.compile's loss trajectory, bf16 evaluation."""
import json
import os
import platform
import re
import resource
import subprocess
import sys

import pytest

import bench
import device
from conftest import ROOT, tiny_flags
from test_main import run_main, weights


def _step_losses(output_dir):
    return [float(v) for v in re.findall(r"\tLoss (\S+) \(", (output_dir / "train.log").read_text())]


def test_compile_follows_the_eager_loss_trajectory(image_folder, tmp_path):
    """aot_eager traces forward and backward graphs as inductor does, in seconds instead of minutes on 2 cores;
    bench.py --compile times inductor itself."""
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        out = tmp_path / name
        run_main(image_folder, *tiny_flags(out, "--epochs", "1", "--max-steps", "3", "--print-freq", "1",
                                           "--seed", "0", "--dropout", "0", "--no-val", *extra))
        losses[name] = _step_losses(out)
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-2)
    assert set(weights(tmp_path / "compiled" / "checkpoint.pth.tar")) == set(weights(tmp_path / "eager" / "checkpoint.pth.tar"))


@pytest.mark.parametrize("name", ["standard", "tensor", "gpu"])
def test_each_pipeline_trains_and_validates_through_main(image_folder, tmp_path, name):
    summary = run_main(image_folder, *tiny_flags(tmp_path, "--epochs", "1", "--max-steps", "2", "--pipeline", name,
                                                 "--fast-val", "--no-checkpoint"))
    assert summary["val_images"] == 15 and summary["train_steps"] == 2


def test_bench_runs_and_writes_its_table(tmp_path, capsys):
    """bench.py at toy sizes (its main.py rows are main.py runs, tested above): it runs, prints and writes JSON."""
    out = tmp_path / "bench.json"
    bench.main(["-a", "mnasnet0_5", "--crop", "48", "--images", "4", "--train-batch", "4", "--eval-batch", "4",
                "--steps", "1", "--repeats", "1", "--warmup-steps", "1", "--skip", "e2e", "--json", str(out)])
    result = json.loads(out.read_text())
    assert len(result["pipeline_img_s_per_worker"]) == 8 and len(result["step_img_s"]) == 7
    assert all(rate > 0 for rate in result["step_img_s"].values())
    assert "train ours" in capsys.readouterr().out


def _page_faults_of_reused_buffers(env):
    """Minor page faults of a process that allocates, touches and frees a 64 MB tensor five times, after main.py's
    CPU set-up."""
    code = ("import resource, torch, device; device.keep_freed_memory()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(5): torch.ones(16 * 2 ** 20)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_cpu_runs_reuse_freed_memory_instead_of_faulting_it_in_again():
    """glibc unmaps a freed 64 MB block and the next one faults in 16,384 fresh pages; main.py's CPU set-up keeps
    it for reuse, unless another allocator is preloaded or the user set glibc's thresholds."""
    plain = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_")}
    pages = 5 * 16 * 2 ** 20 * 4 // resource.getpagesize()
    assert _page_faults_of_reused_buffers(plain) < pages // 4
    assert _page_faults_of_reused_buffers({**plain, "MALLOC_MMAP_THRESHOLD_": "131072"}) > pages * 3 // 4


def test_a_preloaded_allocator_is_left_alone(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert not device.keep_freed_memory()
