"""End-to-end tests of the test/*.sh launchers on CPU: tiny model, tiny crops, a few steps, 2 gloo processes."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (BROKEN_NPU_SITE, LAUNCH_ENV, NETWORK, ROOT, TINY, clean_env, launch, launch_ok, read_case,
                     write_image_folder)


def launcher_env(tmp_path, **extra):
    """A user's environment next to a torch_npu that cannot load (CANN's set_env.sh not sourced)."""
    return {**clean_env(PYTHONPATH=BROKEN_NPU_SITE, PYTHON=sys.executable, HOME=str(tmp_path)), **extra}


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


VAL_IMAGES = 9  # odd on purpose: 2 ranks must still count each image exactly once


SCRIPTS = ["train_full_1p.sh", "train_performance_1p.sh", "train_full_8p.sh", "train_performance_8p.sh",
           "train_eval_8p.sh"]


@pytest.fixture(scope="module", autouse=True)
def wall_clock_that_steps(tmp_path_factory):
    """The launchers run under a `date` whose seconds jump an hour forward at every reading, as NTP or a VM's clock
    sync can step the wall clock during a run: their E2ETrainingTime must not come from it."""
    folder = tmp_path_factory.mktemp("stepping-clock")
    (folder / "date").write_text(f"""#!/bin/sh
[ "$*" = "+%s" ] || exec {shutil.which("date")} "$@"
readings=$(cat "$0.readings" 2>/dev/null || echo 0)
echo $((readings + 1)) > "$0.readings"
echo $(( $({shutil.which("date")} +%s) + 3600 * readings ))
""")
    (folder / "date").chmod(0o755)
    path = LAUNCH_ENV["PATH"]
    LAUNCH_ENV["PATH"] = f"{folder}{os.pathsep}{path}"
    yield
    LAUNCH_ENV["PATH"] = path


def check_common(result, out_dir, fields, summary, case_name, ranks, batch):
    assert fields["Network"] == NETWORK
    assert fields["CaseName"] == case_name
    assert int(fields["RankSize"]) == ranks == summary["world_size"]
    assert int(fields["BatchSize"]) == batch == summary["batch_size"]
    assert fields["Device"] == "cpu"
    assert int(fields["E2ETrainingTime"]) >= 0
    assert f"Final Train Accuracy : {fields['TrainAccuracy']}" in result.stdout
    assert "E2E Training Duration sec : " in result.stdout
    device_id = out_dir.name
    assert (out_dir / f"train_{device_id}.log").is_file()
    for rank in range(1, ranks):
        assert (out_dir / f"rank{rank}.log").is_file()


def check_speed(result, fields, summary, measured_steps, batch):
    """ActualFPS and TrainingTime against what the test knows: the steps it asked for less the FPS warm-up, the
    global batch, and the wall-clock time it waited for the launcher (the measured window lies inside it)."""
    assert summary["measured_steps"] == measured_steps and summary["measured_images"] == measured_steps * batch
    actual_fps, step_ms = float(fields["ActualFPS"]), float(fields["TrainingTime"])
    assert actual_fps * step_ms / 1000 == pytest.approx(batch, rel=1e-3)  # images/s x s/step: the global batch
    assert actual_fps > measured_steps * batch / result.wall_seconds
    assert 0 < step_ms * measured_steps / 1000 < result.wall_seconds
    assert 0 <= int(fields["E2ETrainingTime"]) <= result.wall_seconds + 1  # whole seconds, counted by the script
    # The report rounds main.py's own figures, to the printed digits.
    fps = summary["measured_images"] / summary["measured_seconds"]
    assert float(fields["ActualFPS"]) == pytest.approx(fps, abs=0.006)
    assert float(fields["TrainingTime"]) == pytest.approx(
        1000 * summary["measured_seconds"] / summary["measured_steps"], abs=0.006)
    assert f"Final Performance images/sec : {fields['ActualFPS']}" in result.stdout


def check_rank0_log(log, epochs, validations):
    """One line per step and one validation line per epoch: no other rank wrote into it."""
    text = log.read_text()
    steps = re.findall(r"Epoch: \[\d+\]\[\s*\d+/\d+\]", text)
    assert steps, text
    assert len(steps) == len(set(steps)), f"step lines repeated, several ranks wrote {log}"
    assert {s.split("]")[0] for s in steps} == {f"Epoch: [{e}" for e in range(epochs)}
    assert len(re.findall(r"\* Acc@1 ", text)) == validations


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """ImageNet layout, 3 classes: 4 training images each, 3 validation images each."""
    return Path(write_image_folder(tmp_path_factory.mktemp("launchers"), train_per_class=4, val_per_class=3,
                                   size=80))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    result = launch(script, "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout and "--data_path=" in result.stdout


def test_unknown_argument_lists_accepted_ones():
    result = launch("train_performance_1p.sh", "--batchsize=8")
    assert result.returncode != 0
    assert "unknown argument '--batchsize=8'" in result.stderr
    assert "--batch_size=" in result.stderr and "--device_id=" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--device=tpu"], "--device must be npu, gpu, cpu or auto"),
    (["--batch_size=0"], "--batch_size must be a positive number"),
    (["--amp_level=O3"], "--amp_level must be O1, O2 or off"),
    (["--device_list=0,a"], "--device_list must look like 0,1,2,3"),
    (["--num_devices=4", "--device_list=0,1"], "disagrees with --device_list"),
    (["--batch_size=9", "--num_devices=2", "--device=cpu"], "must be a multiple of the 2 processes"),
])
def test_bad_values(args, message):
    result = launch("train_performance_8p.sh", *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_option_without_value():
    result = launch("train_full_1p.sh", "--data_path", "/tmp")
    assert result.returncode != 0
    assert "--data_path=VALUE" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_wrong_data_path(script, tmp_path):
    missing = tmp_path / "no-such-folder"
    result = launch(script, f"--data_path={missing}", "--device=cpu")
    assert result.returncode != 0
    assert "no such folder" in result.stderr and str(missing) in result.stderr

    (tmp_path / "half" / "train").mkdir(parents=True)
    result = launch(script, f"--data_path={tmp_path / 'half'}", "--device=cpu")
    assert result.returncode != 0
    assert "train/ and val/" in result.stderr


@pytest.mark.parametrize("script", ["train_full_1p.sh", "train_full_8p.sh", "train_eval_8p.sh"])
def test_data_path_required(script):
    result = launch(script, "--device=cpu")
    assert result.returncode != 0
    assert "--data_path=DIR is required" in result.stderr


def test_eval_needs_an_existing_checkpoint(data_dir, tmp_path):
    result = launch("train_eval_8p.sh", f"--data_path={data_dir}", "--device=cpu", "--num_devices=2",
                    f"--output_root={tmp_path}")
    assert result.returncode != 0
    assert f"no such checkpoint: {tmp_path / '0' / 'model_best.pth.tar'}" in result.stderr


@pytest.mark.skipif(Path("/usr/local/Ascend").exists() or Path("/etc/Ascend").exists(),
                    reason="CANN is installed here")
def test_env_npu_without_cann():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND", "MNASNET_", "TASK_QUEUE"))}
    result = subprocess.run(["bash", "-c", "source test/env_npu.sh; source test/env_npu.sh; echo $TASK_QUEUE_ENABLE"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stderr.count("CANN not found") == 1
    assert result.stdout.strip() == "1"


def test_performance_1p_synthetic(tmp_path):
    """--device=auto next to a torch_npu that cannot load: the launcher's own probe and main.py both fall back to
    the CPU. The reference recipe's BatchNorm momentum reaches main.py."""
    result = launch_ok("train_performance_1p.sh", "--device=auto", "--batch_size=8", "--steps=6", "--workers=0",
                       f"--output_root={tmp_path}", *TINY, "--dummy-images", "64", env=launcher_env(tmp_path))
    assert "Traceback" not in result.stderr, result.stderr
    command = re.search(r"^running: (.*)$", result.stdout, re.M).group(1).split()
    assert command[command.index("--bn-momentum") + 1] == "0.1"
    out_dir = tmp_path / "0"
    case = f"{NETWORK}_bs8_1p_perf"
    fields, summary = read_case(out_dir, case)
    check_common(result, out_dir, fields, summary, case, ranks=1, batch=8)
    # 6 steps, the first one (a fifth) left out of the measurement; no validation.
    check_speed(result, fields, summary, measured_steps=5, batch=8)
    assert summary["train_steps"] == 6
    assert summary["val_acc1"] is None
    assert float(fields["TrainAccuracy"]) == pytest.approx(summary["train_acc1"], abs=5e-4)
    assert float(fields["ActualLoss"]) == pytest.approx(summary["train_loss"], abs=5e-5)
    check_rank0_log(out_dir / "train_0.log", epochs=1, validations=0)


def test_full_1p_image_folder(data_dir, tmp_path):
    """An accuracy run, then the same launch with one more epoch: the launchers write to the same folder every time,
    and an accuracy run goes on from its checkpoint (--resume auto)."""
    flags = (f"--data_path={data_dir}", "--device=cpu", "--device_id=3", "--batch_size=4", "--lr=0.05", "--workers=1",
             "--amp_level=off", f"--output_root={tmp_path}")
    result = launch_ok("train_full_1p.sh", *flags, "--epochs=2", *TINY, "--fps-warmup-steps", "1")
    out_dir = tmp_path / "3"
    case = f"{NETWORK}_bs4_1p_acc"
    fields, summary = read_case(out_dir, case)
    check_common(result, out_dir, fields, summary, case, ranks=1, batch=4)
    # 12 images in batches of 4: 3 steps an epoch, the first of each left out of the FPS.
    check_speed(result, fields, summary, measured_steps=2 * 2, batch=4)
    assert summary["epochs"] == 2
    log = out_dir / "train_3.log"
    check_rank0_log(log, epochs=2, validations=2)
    final_acc1 = re.findall(r"\* Acc@1 ([\d.]+)", log.read_text())[-1]
    assert float(fields["TrainAccuracy"]) == pytest.approx(float(final_acc1), abs=5e-4)
    assert float(fields["TrainAccuracy"]) == pytest.approx(summary["val_acc1"], abs=5e-4)
    assert float(fields["ActualLoss"]) == pytest.approx(summary["train_loss"], abs=5e-5)
    assert (out_dir / "checkpoint.pth.tar").is_file()

    again = launch_ok("train_full_1p.sh", *flags, "--epochs=3", *TINY, "--fps-warmup-steps", "1")
    assert "--resume auto" in again.stdout
    _, summary = read_case(out_dir, case)
    assert [row["epoch"] for row in summary["history"]] == [2]


@pytest.fixture(scope="module")
def full_8p(data_dir, tmp_path_factory):
    """A 2-process accuracy run; its checkpoint is evaluated by test_eval_8p. BatchNorm momentum 0.3: its 3 steps
    move the running statistics that validation scores with, and so set the two ranks' apart."""
    root = tmp_path_factory.mktemp("full8p")
    result = launch_ok("train_full_8p.sh", f"--data_path={data_dir}", "--device=cpu", "--num_devices=2",
                       "--batch_size=4", "--epochs=1", "--lr=0.05", "--workers=0", f"--output_root={root}", *TINY,
                       "--fps-warmup-steps", "1", "--bn-momentum", "0.3")
    return result, root / "0"


def test_full_8p(full_8p):
    result, out_dir = full_8p
    case = f"{NETWORK}_bs4_2p_acc"
    fields, summary = read_case(out_dir, case)
    check_common(result, out_dir, fields, summary, case, ranks=2, batch=4)
    check_speed(result, fields, summary, measured_steps=3 - 1, batch=4)  # 12 images, global batch 4
    check_rank0_log(out_dir / "train_0.log", epochs=1, validations=1)
    assert float(fields["TrainAccuracy"]) == pytest.approx(summary["val_acc1"], abs=5e-4)
    # Distributed validation scores each of the 9 images once: a whole number of them is right.
    right = summary["val_acc1"] * VAL_IMAGES / 100
    assert right == pytest.approx(round(right), abs=1e-3)
    assert summary["val_images"] == VAL_IMAGES
    assert (out_dir / "model_best.pth.tar").is_file()


def test_eval_8p(full_8p, data_dir, tmp_path):
    _, train_dir = full_8p
    result = launch_ok("train_eval_8p.sh", f"--data_path={data_dir}", "--device=cpu", "--num_devices=2",
                       "--batch_size=4", "--workers=0", "--launcher=torchrun",
                       f"--resume={train_dir / 'model_best.pth.tar'}", f"--output_root={tmp_path}", *TINY)
    out_dir = tmp_path / "0"
    case = f"{NETWORK}_bs4_2p_eval"
    fields, summary = read_case(out_dir, case)
    check_common(result, out_dir, fields, summary, case, ranks=2, batch=4)
    assert "ActualFPS" not in fields and "Final Performance" not in result.stdout
    assert float(fields["TrainAccuracy"]) == pytest.approx(summary["val_acc1"], abs=5e-4)
    # The checkpoint scored on 2 processes gives what training measured for it.
    _, train_summary = read_case(train_dir, f"{NETWORK}_bs4_2p_acc")
    assert summary["val_acc1"] == pytest.approx(train_summary["best_acc1"], abs=1e-6)
    # And the same loss: training's validation scored rank 0's BatchNorm statistics on both ranks, as saved.
    assert summary["val_loss"] == pytest.approx(train_summary["val_loss"], rel=1e-5)
    assert summary["val_images"] == VAL_IMAGES
    assert len(re.findall(r"\* Acc@1 ", (out_dir / "train_0.log").read_text())) == 1


def test_performance_8p_synthetic(tmp_path):
    result = launch_ok("train_performance_8p.sh", "--device=cpu", "--device_list=0,1", "--batch_size=8",
                       "--steps=4", "--fps_warmup_steps=1", "--workers=0", f"--output_root={tmp_path}", *TINY,
                       "--dummy-images", "64")
    out_dir = tmp_path / "0"
    case = f"{NETWORK}_bs8_2p_perf"
    fields, summary = read_case(out_dir, case)
    check_common(result, out_dir, fields, summary, case, ranks=2, batch=8)
    check_speed(result, fields, summary, measured_steps=3, batch=8)
    assert summary["train_steps"] == 4
    check_rank0_log(out_dir / "train_0.log", epochs=1, validations=0)


# --- the launchers ---

def test_launchers_refuse_an_arch_main_py_does_not_build():
    result = launch("train_performance_1p.sh", "--arch=mnasnet0_9", "--device=cpu", timeout=300)
    assert result.returncode == 2 and "argument -a/--arch: invalid choice: 'mnasnet0_9'" in result.stderr
    result = launch("train_full_8p.sh", "--arch=../x", timeout=60)
    assert result.returncode == 2 and "--arch must be a network name such as mnasnet1_0, not '../x'" in result.stderr


@pytest.mark.parametrize("device_name, message", [
    ("gpu", "NVIDIA apex removed apex.amp in 2025 (25.05 was the last release with it)"),
    ("cpu", "apex runs on an NPU or a GPU"),
])
def test_launcher_amp_level_o2_without_apex_amp_is_a_clear_error(tmp_path, device_name, message):
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("")  # NVIDIA apex 25.07 and later: no apex.amp
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", os.path.join(ROOT, "test", "train_performance_1p.sh"),
                             f"--device={device_name}", "--amp_level=O2", f"--output_root={tmp_path / 'out'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "--amp_level=O1" in result.stderr, result.stderr
    assert "running:" not in result.stdout


def test_launcher_profiles_every_rank_and_reports_the_data_wait_share(tmp_path):
    """Under torchrun (which imports torch before main.py), next to a torch_npu that cannot load."""
    result = launch("train_performance_8p.sh", "--device=cpu", "--num_devices=2", "--launcher=torchrun",
                    "--batch_size=4", "--steps=4", "--workers=0", "--profile", f"--output_root={tmp_path}", "--",
                    "--arch", "mnasnet0_5", "--train-crop-size", "48", "--dummy-images", "32", "--profile-steps",
                    "1,0,1", timeout=300, env=launcher_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    out = tmp_path / "0"
    case = "MnasNet_for_PyTorch_bs4_2p_perf"
    fields = dict(line.split(" = ", 1) for line in (out / f"{case}.log").read_text().splitlines())
    summary = json.loads((out / f"{case}.json").read_text())
    assert float(fields["DataWaitShare"]) == pytest.approx(summary["data_wait_share"], abs=5e-4)
    assert 0 < float(fields["DataWaitShare"]) < 1
    for rank in (0, 1):
        assert len(list((out / "profile").glob(f"rank{rank}.*.pt.trace.json"))) == 1
    # The table is rank 0's alone.
    assert "operators by self time" in (out / "train_0.log").read_text()
    assert "operators by self time" not in (out / "rank1.log").read_text()


@pytest.mark.parametrize("steps, measured, arch_flags, arch", [
    ("1", 1, ["--arch=mnasnet0_75", "--"], "mnasnet0_75"),  # the launcher's own --arch
    ("3", 2, ["--", "--arch", "mnasnet_a1_0_75"], "mnasnet_a1_0_75"),  # main.py's, after --
])
def test_performance_launcher_with_fewer_than_five_steps(tmp_path, steps, measured, arch_flags, arch):
    """A fifth of 1-4 steps is 0 warm-up steps: with 2 or more steps the first is warm-up, with 1 none is. The
    launcher's --arch and main.py's own reach the run (MnasNet-A1 too)."""
    result = launch("train_performance_1p.sh", "--device=cpu", "--batch_size=8", f"--steps={steps}", "--workers=0",
                    f"--output_root={tmp_path}", *arch_flags, "--train-crop-size", "48", "--dummy-images", "64")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "0" / "MnasNet_for_PyTorch_bs8_1p_perf.json").read_text())
    assert summary["train_steps"] == int(steps) and summary["measured_steps"] == measured
    assert summary["fps"] > 0 and summary["arch"] == arch


@pytest.mark.parametrize("flags, timeout", [([], 1800), (["--", "--dist-timeout", "42"], 42),
                                            (["--", "--dist-timeout=7", "--seed", "1"], 7)])
def test_torchrun_waits_at_most_the_dist_timeout_and_says_for_what(tmp_path, flags, timeout):
    """The launch as far as starting torchrun (a stand-in interpreter that prints its arguments): its rendezvous is
    bounded by main.py's --dist-timeout, and the launcher says what it waits for."""
    interpreter = tmp_path / "python"
    interpreter.write_text('#!/bin/sh\necho "interpreter got: $*"\n')
    interpreter.chmod(0o755)
    result = subprocess.run(["bash", str(ROOT / "test" / "train_performance_8p.sh"), "--device=cpu",
                             "--num_devices=2", "--launcher=torchrun", f"--output_root={tmp_path}", *flags],
                            cwd=ROOT, env={**LAUNCH_ENV, "PYTHON": str(interpreter)}, capture_output=True, text=True,
                            timeout=60)
    assert "wrote no summary" in result.stderr  # the stand-in ran no training
    started = re.search(r"^interpreter got: -m torch.distributed.run (.*) \S+/main.py", result.stdout, re.MULTILINE)
    assert started and f"--rdzv-conf join_timeout={timeout}" in started.group(1), result.stdout
    assert (f"torchrun: waiting at most {timeout} s (--dist-timeout) for 1 node of 2 processes, rendezvous on this "
            "host (--standalone)") in result.stdout


def test_a_dist_timeout_that_is_no_number_is_refused_before_torchrun():
    result = launch("train_performance_8p.sh", "--device=cpu", "--launcher=torchrun", "--", "--dist-timeout", "soon")
    assert result.returncode == 2
    assert "--dist-timeout (after --) must be a positive number of seconds, not 'soon'" in result.stderr
