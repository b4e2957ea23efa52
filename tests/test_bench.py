"""bench.py: its runs of main.py and the table it prints."""
import json

import torch

import bench


def test_bench_runs_and_writes_its_table(tmp_path, capsys):
    """bench.py at toy sizes (its main.py rows are main.py runs, tested above): it runs, prints and writes JSON."""
    out = tmp_path / "bench.json"
    bench.main(["-a", "mnasnet0_5", "--crop", "48", "--images", "4", "--train-batch", "4", "--eval-batch", "4",
                "--steps", "1", "--repeats", "1", "--warmup-steps", "1", "--skip", "e2e", "--json", str(out)])
    result = json.loads(out.read_text())
    assert len(result["pipeline_img_s_per_worker"]) == 8 and len(result["step_img_s"]) == 8
    assert all(rate > 0 for rate in result["step_img_s"].values())
    assert "train ours" in capsys.readouterr().out


def test_bench_table_says_when_main_py_measured_no_step(capsys):
    """An end-to-end run whose steps were all warm-up has no FPS (null in main.py's summary): the table says so."""
    row = {"ld_preload": "", "train_img_s": None, "train_steps": 4, "measured_steps": 0, "eval_img_s": 50.0,
           "eval_wall_s": 3.0, "peak_rss_mb": 900.0, "peak_device_mb": None}
    bench.print_table({"end_to_end": {"ours": row, "plain": dict(row)}, "peak_rss_mb": 1000.0,
                       "peak_device_mb": None, "machine": {"cpu": "cpu", "platform": "linux", "cpus": 2,
                                                           "device": "cpu", "torch": torch.__version__, "threads": 1,
                                                           "ld_preload": "", "load_average_start": None,
                                                           "load_average_end": None}})
    lines = [line for line in capsys.readouterr().out.splitlines() if "ours: train img/s" in line]
    assert len(lines) == 1 and "no measured step (4 steps, all warm-up)" in lines[0]
