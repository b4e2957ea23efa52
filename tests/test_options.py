"""The command line's two steps: check_args only checks, prepare derives the run's settings in one place."""
import argparse
import copy

import pytest

import main
from helpers import tiny_flags
from training.utils import UserError

DERIVED = {"device_kind", "device_ids", "data_dir", "named_weights", "val_preprocessing", "profile_window"}


def test_check_args_changes_nothing_and_creates_nothing(image_folder, tmp_path):
    args = main.parse_args([image_folder, *tiny_flags(tmp_path / "out"), "--profile", "--profile-steps", "1,1,1"])
    parsed = copy.deepcopy(vars(args))
    main.check_args(args)
    assert vars(args) == parsed
    assert not (tmp_path / "out").exists()


def test_prepare_sets_the_derived_settings_and_only_those(image_folder, tmp_path):
    args = main.parse_args([image_folder, *tiny_flags(tmp_path / "out")])
    parsed = argparse.Namespace(**copy.deepcopy(vars(args)))
    main.check_args(args)
    assert main.prepare(args) is args
    assert set(vars(args)) - set(vars(parsed)) == DERIVED
    assert {name for name in vars(parsed) if getattr(parsed, name) != getattr(args, name)} == set()
    assert (args.device_kind, args.device_ids, args.data_dir) == ("cpu", [0], image_folder)
    assert (tmp_path / "out").is_dir()


def test_a_command_line_mistake_is_found_before_the_output_folder_exists(tmp_path):
    args = main.parse_args(["--dummy", "--crop-pct", "1.5", "--output-dir", str(tmp_path / "out")])
    with pytest.raises(UserError, match="--crop-pct must be in"):
        main.check_args(args)
    assert not (tmp_path / "out").exists()
