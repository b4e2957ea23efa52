"""training/metrics.py: the per-epoch metrics file, its TensorBoard twin and the PNG of the curves."""
import csv

import pytest
from PIL import Image

from helpers import run_main_in_process, tiny_flags
from training import checkpoint, metrics


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def resumed_run(image_folder, tmp_path_factory):
    """A 3-epoch run that dies after writing epoch 1's metrics row but before its checkpoint, then resumes."""
    output_dir = tmp_path_factory.mktemp("metrics")
    flags = tiny_flags(output_dir, "--epochs", "3", "--seed", "0", "--tensorboard")

    class Killed(Exception):
        pass

    save = checkpoint.save_checkpoint

    def die_before_second_save(state, is_best, folder, **options):
        if state["epoch"] == 2:
            raise Killed
        return save(state, is_best, folder, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", die_before_second_save)
        with pytest.raises(Killed):
            run_main_in_process(image_folder, *flags)
    assert [row["epoch"] for row in read_csv(output_dir / metrics.CSV_NAME)] == ["0", "1"]
    summary = run_main_in_process(image_folder, *flags, "--resume", str(output_dir / checkpoint.CHECKPOINT_NAME))
    return output_dir, summary


def test_csv_has_one_row_per_epoch_after_resume(resumed_run):
    output_dir, summary = resumed_run
    rows = read_csv(output_dir / metrics.CSV_NAME)
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    assert tuple(rows[0]) == metrics.FIELDS
    last = rows[-1]
    assert float(last["train_loss"]) == pytest.approx(summary["train_loss"], rel=1e-5)
    assert float(last["val_acc1"]) == pytest.approx(summary["val_acc1"], rel=1e-5)
    assert float(last["val_loss"]) == pytest.approx(summary["val_loss"], rel=1e-5)
    for row in rows:
        assert float(row["lr"]) > 0 and float(row["images_per_s"]) > 0
        assert float(row["epoch_seconds"]) > 0 and 0 <= float(row["val_acc5"]) <= 100


def test_tensorboard_scalars_match_after_resume(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    output_dir, _ = resumed_run
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    steps = [event.step for event in events.Scalars("train_loss")]
    assert steps == [0, 1, 2]
    rows = read_csv(output_dir / metrics.CSV_NAME)
    assert [event.value for event in events.Scalars("val_acc1")] == pytest.approx(
        [float(row["val_acc1"]) for row in rows], rel=1e-5)


def test_plot_at_end_of_run_and_on_demand(resumed_run, tmp_path, capsys):
    output_dir, _ = resumed_run
    with Image.open(output_dir / metrics.PNG_NAME) as image:
        assert image.format == "PNG" and image.size[0] > 200
    points = metrics.plot_curves(output_dir / metrics.CSV_NAME, tmp_path / "curves.png")
    assert points == {"train loss": 3, "val loss": 3, "train Acc@1": 3, "val Acc@1": 3, "val Acc@5": 3}
    metrics.main([str(output_dir / metrics.CSV_NAME), "-o", str(tmp_path / "cli.png")])
    assert "train loss: 3" in capsys.readouterr().out
    with Image.open(tmp_path / "cli.png") as image:
        image.verify()


def test_no_val_leaves_val_cells_empty(image_folder, tmp_path):
    run_main_in_process(image_folder, *tiny_flags(tmp_path, "--epochs", "1", "--max-steps", "2", "--no-val",
                                                  "--no-checkpoint"))
    (row,) = read_csv(tmp_path / metrics.CSV_NAME)
    assert row["val_acc1"] == "" and row["val_loss"] == "" and float(row["train_loss"]) > 0
    assert metrics.plot_curves(tmp_path / metrics.CSV_NAME, tmp_path / "p.png") == {"train loss": 1, "train Acc@1": 1}


def test_plot_of_a_missing_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        metrics.main([str(tmp_path / "none.csv")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: metrics file not found: {tmp_path / 'none.csv'}"


def test_progress_bar_on_a_terminal_only(image_folder, tmp_path, capsys, monkeypatch):
    from training import engine, utils
    run_main_in_process(image_folder, *tiny_flags(tmp_path / "pipe", "--epochs", "1", "--max-steps", "2",
                                                  "--no-checkpoint"))
    assert "img/s" not in capsys.readouterr().out
    monkeypatch.setattr(utils, "interactive", lambda: True)
    monkeypatch.setattr(engine, "interactive", lambda: True)
    run_main_in_process(image_folder, *tiny_flags(tmp_path / "tty", "--epochs", "1", "--max-steps", "2",
                                                  "--no-checkpoint"))
    console = capsys.readouterr().out
    assert "Epoch 0: " in console and "img/s" in console  # the bar
    assert "Epoch: [0][2/2]\tTime " in console  # the reference lines, printed above it
    log = (tmp_path / "tty" / "train.log").read_text()
    assert "Epoch: [0][2/2]\tTime " in log and "img/s" not in log and "\r" not in log
