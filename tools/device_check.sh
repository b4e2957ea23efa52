#!/usr/bin/env bash
# Acceptance check on a GPU or NPU machine (see tools/device_check.py); on the CPU: --device cpu --quick.
# CANN's environment first (test/env_npu.sh: sourced where CANN is installed; without it, torch_npu is left alone).
set -euo pipefail
cd "$(dirname "$0")/.."
set +u
# shellcheck source=/dev/null
source test/env_npu.sh
set -u
exec "${PYTHON:-python3}" tools/device_check.py "$@"
