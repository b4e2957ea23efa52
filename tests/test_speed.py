"""Speed options give the results of the plain paths: torch.compile's loss trajectory, bf16 evaluation."""
import json
import re

import pytest

import bench
from conftest import tiny_flags
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

