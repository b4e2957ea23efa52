#!/usr/bin/env bash
# Runs the CPU test suite against another torch release: tools/compat_check.sh 2.6.0
# A scratch venv (removed at the end) with that torch, its torchvision and requirements-common.txt; not
# requirements.lock, whose pins of torch's own dependencies (triton, sympy, nvidia-*) are requirements.txt's torch's.
set -euo pipefail
if [[ $# -ne 1 || ! $1 =~ ^2\.([0-9]+)\.[0-9]+$ ]]; then
    echo "usage: $0 TORCH_VERSION   (a 2.x.y release, e.g. 2.6.0)" >&2
    exit 2
fi
torch_version=$1
# The torchvision series built against each torch series (each torchvision wheel requires one exact torch,
# so pip picks the patch release that matches).
case ${BASH_REMATCH[1]} in
    6) torchvision_series=0.21 ;;
    7) torchvision_series=0.22 ;;
    8) torchvision_series=0.23 ;;
    9) torchvision_series=0.24 ;;
    10) torchvision_series=0.25 ;;
    11) torchvision_series=0.26 ;;
    12) torchvision_series=0.27 ;;
    13) torchvision_series=0.28 ;;
    14) torchvision_series=0.29 ;;
    *) echo "$0: torch $torch_version is outside the supported range 2.6 to 2.14 (README, Requirements)" >&2
       exit 2 ;;
esac
cd "$(dirname "$0")/.."
venv=$(mktemp -d "${TMPDIR:-/tmp}/mnasnet-compat-venv.XXXXXX")
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
start=$SECONDS
"$venv/bin/python" -m pip install -q "torch==$torch_version" "torchvision==$torchvision_series.*" \
    -r requirements-common.txt
installed=$((SECONDS - start))
"$venv/bin/python" -c 'import torch, torchvision
print(f"compat_check: torch {torch.__version__}, torchvision {torchvision.__version__}")'
echo "compat_check: installed in ${installed} s"
start=$SECONDS
status=0
"$venv/bin/python" -m pytest -q -n auto --dist loadfile tests || status=$?
echo "compat_check: torch $torch_version: tests took $((SECONDS - start)) s, pytest exit status $status"
exit "$status"
