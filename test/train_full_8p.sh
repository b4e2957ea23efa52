#!/bin/bash
# Accuracy run on 8 devices: the published recipe (batch 4096, lr 1.4, 300 epochs, AMP O1).
# Options: bash test/train_full_8p.sh --help
kind="acc"
scale="8p"
lr=1.4
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
