#!/usr/bin/env bash
# ONNX to Ascend .om with ATC (see tools/onnx_to_om.py), in CANN's environment, which puts atc on PATH; without
# CANN the script prints the atc commands instead. Paths are taken as given, relative to the current directory.
TOOLS_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
source "$TOOLS_DIR/../test/env_npu.sh"
exec "${PYTHON:-python3}" "$TOOLS_DIR/onnx_to_om.py" "$@"
