"""Speed options give the results of the plain paths: torch.compile's loss trajectory, bf16 evaluation."""
import json
import re

import pytest
import torch
import torchvision

import bench
import device
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


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16: --amp "
                    "trains in fp32 on it")
def test_cpu_amp_training_follows_the_fp32_loss_trajectory(image_folder, tmp_path):
    """--amp on the CPU trains in bf16 with the depthwise convolutions in fp32: the fp32 losses to bf16's
    precision, and checkpoints with the same plain keys."""
    losses = {}
    for name, extra in (("fp32", []), ("amp", ["--amp"])):
        out = tmp_path / name
        run_main(image_folder, *tiny_flags(out, "--epochs", "1", "--max-steps", "4", "--print-freq", "1",
                                           "--seed", "0", "--dropout", "0", "--no-val", *extra))
        losses[name] = _step_losses(out)
    assert "bf16, depthwise convolutions fp32 in training" in (tmp_path / "amp" / "train.log").read_text()
    assert len(losses["fp32"]) == 4 and losses["amp"] != losses["fp32"]
    # The first loss differs by the forward pass's rounding only; then the weights drift apart a little each step
    # (measured: 0.6% at the first step, 6% at the fourth, on this run whose fp32 loss itself rises by 24%).
    assert losses["amp"][0] == pytest.approx(losses["fp32"][0], rel=1e-2)
    assert losses["amp"] == pytest.approx(losses["fp32"], rel=0.1)
    assert set(weights(tmp_path / "amp" / "checkpoint.pth.tar")) == set(weights(tmp_path / "fp32" / "checkpoint.pth.tar"))


def test_depthwise_convolutions_leave_autocast_only_in_training():
    model = torchvision.models.mnasnet0_5(num_classes=3)
    precision = device.NativeAmp("cpu", "dynamic")
    precision.prepare(model)
    depthwise = model.layers[3]  # the stem's 3x3 depthwise convolution
    dtypes = []
    depthwise.register_forward_hook(lambda module, args, output: dtypes.append((args[0].dtype, output.dtype)))
    x = torch.randn(2, 3, 48, 48)
    for mode in (model.train, model.eval):
        mode()
        with precision.autocast():
            assert model(x).dtype == precision.dtype
    # Training: fp32 in (computed in fp32), bf16 out; evaluation: the bf16 convolution.
    assert dtypes == [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]


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
    assert len(result["pipeline_img_s_per_worker"]) == 8 and len(result["step_img_s"]) == 8
    assert all(rate > 0 for rate in result["step_img_s"].values())
    assert "train ours" in capsys.readouterr().out
