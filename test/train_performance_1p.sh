#!/bin/bash
# Performance run on 1 device: the 1p recipe for a bounded number of steps, FPS measured (synthetic data without --data_path).
# Options: bash test/train_performance_1p.sh --help
kind="perf"
scale="1p"
lr=0.7
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
