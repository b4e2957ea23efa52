#!/usr/bin/env bash
# Acceptance check on a GPU or NPU machine (see tools/device_check.py); on the CPU: --device cpu --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tools/device_check.py "$@"
