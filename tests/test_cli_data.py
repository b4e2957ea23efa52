"""main.py with data that is not as it should be: missing folders and classes, quirky and unreadable images,
--strict-data."""
import os

import pytest
from PIL import Image

import main
from helpers import expect_error, run_main_in_process, tiny_flags, write_image_folder, write_jpeg_with_corrupt_scan
from training import data, transforms


def test_strict_data_stops_at_a_file_only_the_device_stage_finds(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", train_per_class=3, val_per_class=1)
    bad = write_jpeg_with_corrupt_scan(os.path.join(root, "train", "n02_green", "scan.JPEG"))
    err = expect_error(capsys, [root, *tiny_flags(tmp_path / "out", "--epochs", "1", "--pipeline", "gpu",
                                                  "--strict-data", "-b", "10")], "--strict-data")
    assert bad in err


def test_missing_data_folder(tmp_path, capsys):
    expect_error(capsys, [str(tmp_path / "nowhere"), *tiny_flags(tmp_path)], "nowhere")


def test_data_folder_without_train(tmp_path, capsys):
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    expect_error(capsys, [str(tmp_path / "data"), *tiny_flags(tmp_path / "out")], "train")


def test_val_class_missing_from_train(image_folder, tmp_path, capsys):
    data_dir = write_image_folder(tmp_path / "data", 2, 1)
    os.rename(os.path.join(data_dir, "val", "n03_blue"), os.path.join(data_dir, "val", "n04_purple"))
    expect_error(capsys, [data_dir, *tiny_flags(tmp_path / "out")], "n04_purple")


def _save(path, mode, fmt):
    Image.new(mode, (40, 40), {"L": 90, "CMYK": (10, 200, 200, 0), "RGB": (200, 40, 40)}[mode]).save(path, format=fmt)


def _add_quirks(root):
    """What ImageNet's train set holds besides RGB JPEGs: CMYK and grayscale JPEGs, a PNG named .JPEG, and
    files that are not images beside the images."""
    folder = os.path.join(root, "train", "n01_red")
    _save(os.path.join(folder, "cmyk.JPEG"), "CMYK", "JPEG")
    _save(os.path.join(folder, "grey.JPEG"), "L", "JPEG")
    _save(os.path.join(folder, "png_inside.JPEG"), "RGB", "PNG")
    for name in ("notes.txt", ".DS_Store", "Thumbs.db"):
        with open(os.path.join(folder, name), "w") as handle:
            handle.write("not an image\n")


def _add_unreadable(root):
    """A truncated JPEG, an empty file and a text file named .JPEG in train/, a truncated JPEG in val/."""
    paths = []
    for split, cls, name in (("train", "n01_red", "truncated.JPEG"), ("train", "n02_green", "empty.JPEG"),
                             ("train", "n03_blue", "text.JPEG"), ("val", "n02_green", "truncated.JPEG")):
        path = os.path.join(root, split, cls, name)
        if name == "truncated.JPEG":
            _save(path, "RGB", "JPEG")
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
        else:
            with open(path, "w") as handle:
                handle.write("" if name == "empty.JPEG" else "<html>404</html>\n")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("bad"), train_per_class=7, val_per_class=2)
    _add_quirks(root)
    return root, _add_unreadable(root)


def test_quirky_images_train_without_complaint(tmp_path):
    root = write_image_folder(tmp_path / "data", train_per_class=3, val_per_class=1)
    _add_quirks(root)
    train_set, _ = data.image_folders(root, transforms.train_transform(48), None)
    assert len(train_set) == 12  # the three quirky images count, the stray files do not
    summary = run_main_in_process(root, *tiny_flags(tmp_path / "out", "--epochs", "1", "--strict-data"))
    assert summary["train_skipped_images"] == 0 and summary["val_images"] == 3
    assert "unreadable" not in (tmp_path / "out" / "train.log").read_text()


def test_unreadable_images_are_logged_once_replaced_and_counted(bad_folder, tmp_path):
    root, bad = bad_folder
    summary = run_main_in_process(root, *tiny_flags(tmp_path, "--epochs", "2", "-j", "1", "--seed", "0"))
    log = (tmp_path / "train.log").read_text()
    for path in bad:
        assert log.count(path) == 1, log  # with a loader worker: the main process still reports it, once
    assert "=> epoch 0: 3 unreadable images replaced" in log and "=> epoch 1: 3 unreadable images replaced" in log
    assert summary["train_skipped_images"] == 3 and [h["train_skipped_images"] for h in summary["history"]] == [3, 3]
    assert summary["train_steps"] == 2 * (24 // 8)  # replaced, not dropped: every batch is full
    assert summary["val_images"] == 6 and summary["val_skipped_images"] == 1
    assert "(6 images scored, 1 unreadable skipped)" in log


def test_strict_data_makes_an_unreadable_image_an_error(bad_folder, tmp_path, capsys):
    root, bad = bad_folder
    err = expect_error(capsys, [root, *tiny_flags(tmp_path, "--epochs", "1", "--strict-data")], "--strict-data")
    assert any(path in err for path in bad)


def test_dataset_replaces_in_training_and_marks_in_validation(bad_folder):
    root, bad = bad_folder
    train_set, val_set = data.image_folders(root, transforms.train_transform(48), transforms.val_transform(52, 48))
    index = [path for path, _ in train_set.samples].index(bad[2])
    assert index == len(train_set) - 1  # the last sample: replaced by the first
    image, label = train_set[index]
    assert image.shape == (3, 48, 48) and label == train_set.samples[0][1]
    assert train_set.unreadable.nonzero().flatten().tolist() == [index]
    index = [path for path, _ in val_set.samples].index(bad[3])
    assert val_set[index][1] == data.SKIPPED_LABEL


@pytest.mark.parametrize("empty", ["train/b", "val/b"])
def test_empty_class_folder_is_an_error_naming_it(tmp_path, empty):
    for folder in ("train/a", "train/b", "val/a", "val/b"):
        os.makedirs(tmp_path / folder)
        if folder != empty:
            _save(tmp_path / folder / "0.png", "RGB", "PNG")
    with pytest.raises(main.UserError, match=str(tmp_path / empty)):
        data.image_folders(tmp_path, None, None)
