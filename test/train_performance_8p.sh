#!/bin/bash
# Performance run on 8 devices: the 8p recipe for a bounded number of steps, FPS measured (synthetic data without --data_path).
# Options: bash test/train_performance_8p.sh --help
kind="perf"
scale="8p"
lr=1.4
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
