#!/bin/bash
# Ascend NPU environment, sourced by the train_*.sh launchers (or by hand: `source test/env_npu.sh`).
# Sources CANN's set_env.sh where CANN is installed and exports the runtime variables the ModelZoo
# scripts set. Values already in the environment win, so a user can override any of them.
# Without CANN it says so once and turns off torch's autoloading of torch_npu, which cannot load without
# CANN: the run goes on (GPU/CPU).

_mnasnet_source_cann() {
    local base="" cfg root f
    # set_env.sh already sourced in this shell (or by the container): nothing to do. CANN 8.5+ sets
    # ASCEND_HOME_PATH (older releases also ASCEND_TOOLKIT_HOME).
    for f in "${ASCEND_HOME_PATH:-}" "${ASCEND_TOOLKIT_HOME:-}"; do
        if [[ -n $f && -d $f ]]; then
            return 0
        fi
    done
    # Where the installer recorded its path: /etc/Ascend for root, ~/Ascend for other users.
    for cfg in /etc/Ascend/ascend_cann_install.info "${HOME:-/nonexistent}/Ascend/ascend_cann_install.info"; do
        if [[ -z $base && -f $cfg ]]; then
            base=$(sed -n 's/^Install_Path=//p' "$cfg" | head -n 1)
        fi
    done
    # CANN 8.5+ installs to <path>/cann, older releases to <path>/ascend-toolkit (or nnae); the default <path>
    # is /usr/local/Ascend for root and ~/Ascend for other users.
    for root in ${ASCEND_HOME:+"$ASCEND_HOME"} ${base:+"$base"} /usr/local/Ascend ${HOME:+"$HOME/Ascend"}; do
        for f in "$root/set_env.sh" "$root/cann/set_env.sh" "$root/ascend-toolkit/set_env.sh" "$root/nnae/set_env.sh"; do
            if [[ -f $f ]]; then
                # shellcheck source=/dev/null
                source "$f"
                return 0
            fi
        done
    done
    return 1
}

if _mnasnet_source_cann; then
    # Device-side logs at error level and device event logs off, as the ModelZoo scripts do.
    if command -v msnpureport >/dev/null 2>&1; then
        for _d in 0 1 2 3 4 5 6 7; do
            # A device id this host lacks fails; a script sourcing this under `set -e` must go on.
            msnpureport -g error -d "$_d" >/dev/null 2>&1 || true
        done
        msnpureport -e disable >/dev/null 2>&1 || true
        unset _d
    fi
    if [[ -z "${HCCL_IF_IP:-}" ]] && _ip=$(hostname -I 2>/dev/null | awk '{print $1}') && [[ -n $_ip ]]; then
        export HCCL_IF_IP=$_ip
    fi
    unset _ip
else
    if [[ -z "${MNASNET_NO_CANN_NOTED:-}" ]]; then
        echo "env_npu.sh: CANN not found (no set_env.sh under \$ASCEND_HOME, the path in ascend_cann_install.info, /usr/local/Ascend or ~/Ascend, in cann/ or ascend-toolkit/); running without the NPU environment" >&2
        export MNASNET_NO_CANN_NOTED=1
    fi
    # Without CANN an installed torch_npu cannot load, and torch's autoloading of it would fail every
    # `import torch` (GPU and CPU runs too); main.py imports torch_npu itself when a run asks for an NPU.
    export TORCH_DEVICE_BACKEND_AUTOLOAD=${TORCH_DEVICE_BACKEND_AUTOLOAD:-0}
fi
unset -f _mnasnet_source_cann

# Host logs off the console, error level, no event logs.
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}
# Asynchronous operator dispatch (level 1 works in both compile modes).
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
# Fused copies/combined operators; PTCOPY_ENABLE and DYNAMIC_OP only matter to older torch_npu releases.
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
export PTCOPY_ENABLE=${PTCOPY_ENABLE:-1}
export DYNAMIC_OP=${DYNAMIC_OP:-"ADD#MUL"}
# HCCL: no whitelist check; 8 processes compiling kernels on first use need more than the 120 s default.
export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
