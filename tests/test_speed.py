"""Speed options give the results of the plain paths: torch.compile's loss trajectory, bf16 evaluation."""
import json
import math
import os
import re

import pytest
import torch
import torchvision
import torchvision.transforms as T

import bench
import mnasnet
from helpers import ConvolutionDtypes, run_main_in_process, tiny_flags, weights
from training import prefetch, transforms
from training.precision import NativeAmp


def _step_losses(output_dir):
    return [float(v) for v in re.findall(r"\tLoss (\S+) \(", (output_dir / "train.log").read_text())]


def test_compile_follows_the_eager_loss_trajectory(image_folder, tmp_path, monkeypatch):
    """--compile (inductor, its default) trains as eager does: forward and backward graphs of generated C++ kernels.

    Inductor builds each kernel with the C++ compiler, minutes for the whole mnasnet0_5 on a busy 2-core machine
    (measured 205 s), so the network is cut to its stem and the first inverted residual block (measured 45-66 s
    for this test with inductor's cache empty, 5 s with it filled)."""
    kernel_size, stride, expansion, _ = mnasnet._STACKS[0]
    monkeypatch.setattr(mnasnet, "_STACKS", ((kernel_size, stride, expansion, 1),))
    counters = torch._dynamo.utils.counters
    graphs = counters["stats"]["unique_graphs"]
    inductor_graphs = sum(n for key, n in counters["inductor"].items() if key.startswith("fxgraph_cache"))
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        run_main_in_process(image_folder, *tiny_flags(out, "--epochs", "1", "--max-steps", "3", "--print-freq", "1",
                                                      "--seed", "0", "--dropout", "0", "--no-val", *extra))
        losses[name] = _step_losses(out)
    # One graph for the whole network, no breaks; inductor generated (or took from its cache) its forward and
    # backward code.
    assert counters["stats"]["unique_graphs"] == graphs + 1 and not counters["graph_break"]
    assert sum(n for key, n in counters["inductor"].items() if key.startswith("fxgraph_cache")) >= inductor_graphs + 2
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)
    assert set(weights(tmp_path / "compiled" / "checkpoint.pth.tar")) == set(weights(tmp_path / "eager" / "checkpoint.pth.tar"))


def test_cpu_amp_training_follows_the_fp32_loss_trajectory(image_folder, tmp_path, bf16_cpu):
    """--amp on the CPU trains in bf16 with the depthwise convolutions in fp32, forward and backward: the fp32
    losses to bf16's precision, and checkpoints with the same plain keys."""
    losses, convolutions = {}, {}
    for name, extra in (("fp32", []), ("amp", ["--amp"])):
        out = tmp_path / name
        with ConvolutionDtypes() as convolutions[name]:
            run_main_in_process(image_folder, *tiny_flags(out, "--epochs", "1", "--max-steps", "4", "--print-freq",
                                                          "1", "--seed", "0", "--dropout", "0", "--no-val", *extra))
        losses[name] = _step_losses(out)
    assert "bf16, depthwise convolutions fp32 in training" in (tmp_path / "amp" / "train.log").read_text()
    # mnasnet0_5 has 17 depthwise and 35 other convolutions; 4 steps. The losses cannot tell bf16 everywhere from
    # this mix (measured off fp32: the mix 0.6% at step 1, at most 5% after; bf16 everywhere 1.1%, at most 5%);
    # the dtypes the convolutions ran in can.
    bf16, fp32 = torch.bfloat16, torch.float32
    assert convolutions["amp"].calls == {
        ("forward", True, fp32, fp32): 17 * 4, ("backward", True, fp32, fp32): 17 * 4,
        ("forward", False, bf16, bf16): 35 * 4, ("backward", False, bf16, bf16): 35 * 4}
    assert set(convolutions["fp32"].calls) == {(way, depthwise, fp32, fp32) for way in ("forward", "backward")
                                               for depthwise in (True, False)}
    assert len(losses["fp32"]) == 4 and losses["amp"] != losses["fp32"]
    # The first loss differs by the forward pass's rounding only; then the weights drift apart a little each step
    # (measured: 0.6% at the first step on every torch; after it at most 5% on torch 2.14, 10.1% at the third step
    # on torch 2.6, whose bf16 backward kernels round differently; this run's fp32 loss itself rises by 24%).
    assert losses["amp"][0] == pytest.approx(losses["fp32"][0], rel=1e-2)
    assert losses["amp"] == pytest.approx(losses["fp32"], rel=0.15)
    assert set(weights(tmp_path / "amp" / "checkpoint.pth.tar")) == set(weights(tmp_path / "fp32" / "checkpoint.pth.tar"))


def test_depthwise_convolutions_leave_autocast_only_in_training(bf16_cpu):
    model = torchvision.models.mnasnet0_5(num_classes=3)
    precision = NativeAmp("cpu", "dynamic")
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


# The code that turns a file into the network's input under each --pipeline (with --fast-val), in training and in
# validation; fast, the default, has its own (FastTrain, FastVal).
PIPELINE_STAGES = {"standard": {"RandomResizedCrop", "CenterCrop"},  # torchvision's PIL transforms, in the workers
                   "tensor": {"TensorTrain", "TensorVal"},  # torchvision.io decode, uint8 tensors, in the workers
                   "gpu": {"DeviceDecode train", "DeviceDecode val"}}  # the workers read bytes, the device decodes


def _record_stages(patch, stages):
    """Add to ``stages`` the name of each stage of PIPELINE_STAGES, or of the fast pipeline, as it runs."""
    def record(cls, method, stage):
        original = getattr(cls, method)

        def recorded(self, *args, **kwargs):
            stages.add(stage(self))
            return original(self, *args, **kwargs)
        patch.setattr(cls, method, recorded)
    record(T.RandomResizedCrop, "forward", lambda self: "RandomResizedCrop")
    record(T.CenterCrop, "forward", lambda self: "CenterCrop")
    for cls in (transforms.FastTrain, transforms.FastVal, transforms.TensorTrain, transforms.TensorVal):
        record(cls, "__call__", lambda self: type(self).__name__)
    record(prefetch.DeviceDecode, "__call__", lambda self: f"DeviceDecode {'train' if self.train else 'val'}")


def _pipeline_run(image_folder, output_dir, name):
    """Two steps and a validation with --pipeline NAME: the summary, the stages that ran, and the batches the
    network was given in training and in validation (where it is a BatchNorm-folded torch.fx copy)."""
    stages, batches = set(), {True: [], False: []}

    def record_input(module, args):
        if isinstance(module, (mnasnet.MNASNet, torch.fx.GraphModule)):
            batches[module.training].append(args[0])

    with pytest.MonkeyPatch.context() as patch:
        _record_stages(patch, stages)
        hook = torch.nn.modules.module.register_module_forward_pre_hook(record_input)
        try:
            # --seed 0: the same training images, in the same order, in every run.
            summary = run_main_in_process(image_folder, *tiny_flags(output_dir, "--epochs", "1", "--max-steps", "2",
                                                                    "--seed", "0", "--pipeline", name, "--fast-val",
                                                                    "--no-checkpoint"))
        finally:
            hook.remove()
    return summary, stages, batches[True], torch.cat(batches[False])


@pytest.fixture(scope="module")
def standard_first_batch(image_folder, tmp_path_factory):
    """The first training batch the standard pipeline gives the network."""
    _, _, train, _ = _pipeline_run(image_folder, tmp_path_factory.mktemp("standard"), "standard")
    return train[0]


@pytest.mark.parametrize("name", ["standard", "tensor", "gpu"])
def test_each_pipeline_trains_and_validates_through_main(image_folder, tmp_path, name, standard_first_batch):
    summary, stages, train, val = _pipeline_run(image_folder, tmp_path, name)
    assert summary["val_images"] == 15 and summary["train_steps"] == 2
    # That pipeline's code made the training and the validation images, and no other pipeline's did.
    assert stages == PIPELINE_STAGES[name]
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["val_loss"])
    # Validation draws no random numbers: the network is given the standard pipeline's pixels (tiny_flags' resize
    # 52, centre crop 48), normalised, less than two levels of 255 apart (resampling rounds differently).
    val_set = torchvision.datasets.ImageFolder(os.path.join(image_folder, "val"), transforms.val_transform(52, 48))
    expected = torch.stack([image for image, _ in val_set])
    torch.testing.assert_close(val, expected, rtol=0, atol=2 / (255 * min(transforms.IMAGENET_STD)))
    # Training: the same images, cropped as each pipeline draws its crops (gpu on the device, with other random
    # numbers): each channel's mean over the first batch is the standard pipeline's (measured: gpu 0.006 off).
    torch.testing.assert_close(train[0].mean(dim=(0, 2, 3)), standard_first_batch.mean(dim=(0, 2, 3)), rtol=0,
                               atol=0.05)


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
