#!/bin/bash
# Accuracy run on 1 device: the published recipe (batch 512, lr 0.7, 300 epochs, AMP O1).
# Options: bash test/train_full_1p.sh --help
kind="acc"
scale="1p"
lr=0.7
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
