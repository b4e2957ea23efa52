#!/bin/bash
# Distributed evaluation of a checkpoint (--resume=) on 8 devices.
# Options: bash test/train_eval_8p.sh --help
kind="eval"
scale="8p"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
