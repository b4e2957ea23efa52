# shellcheck shell=bash disable=SC2154  # kind, scale and lr are set by the launcher that sources this
# Shared logic of the test/train_*.sh launchers; sourced, never run.
# A launcher sets the recipe of its case and calls `launch "$@"`:
#   kind=acc|perf|eval   scale=1p|8p   lr=<base learning rate>
# launch() below tells the story of a run; the functions follow in the order it calls them.

# --- The recipe and the launchers' defaults ---

NETWORK=MnasNet_for_PyTorch
BATCH_PER_DEVICE=512        # published recipe: 512 images per device (1p 512, 8p 4096)
EPOCHS=300
WARMUP_EPOCHS=5
WEIGHT_DECAY=1e-5
MOMENTUM=0.9
LABEL_SMOOTHING=0.1
# The reference's mnasnet.py trains with BatchNorm momentum 0.1 (its published 72.819 Acc@1); passed
# explicitly, so a change of main.py's default cannot change the recipe.
BN_MOMENTUM=0.1
# The reference's network (MnasNet-B1 1.0); --arch= picks another of main.py's -a choices.
ARCH=mnasnet1_0
AMP_LEVEL=O1
LOSS_SCALE=dynamic
NUM_DEVICES_8P=8
# main.py's --dist-timeout default (seconds): how long a rank waits for the others, at the rendezvous too.
DIST_TIMEOUT=1800
PERF_STEPS=1000
PERF_FPS_WARMUP=20
# A CPU can't run the recipe's batch in reasonable time; perf runs there default to this.
CPU_PERF_BATCH_PER_PROCESS=16
CPU_PERF_STEPS=20

TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$TEST_DIR")
PY=${PYTHON:-python3}

# --- The story of a launch ---

launch() {
    local start
    start=$(monotonic_seconds)
    # The options, checked before anything slow.
    declare_options
    parse_args "$@"
    apply_defaults
    check_values
    resolve_dist_timeout
    # What the run is: its data, devices and settings, and where its files go.
    resolve_data_path
    resolve_device_list
    resolve_device
    resolve_batch_and_steps
    resolve_fps_warmup
    resolve_outputs
    check_amp_level
    # The machine and the output folder.
    [[ $device == cpu ]] && tune_cpu
    prepare_output_dir
    # main.py, which starts a process per rank; then the summary.
    build_command
    run_main
    report $(($(monotonic_seconds) - start))
}

# --- Small helpers ---

# Whole seconds since boot: the wall clock can be stepped during a run (NTP, a VM's clock sync), this cannot.
monotonic_seconds() {
    local uptime rest
    read -r uptime rest < /proc/uptime
    echo "${uptime%.*}"
}

die() {
    echo "error: $*" >&2
    exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# Absolute path of $1 taken relative to the caller's working directory.
abspath() {
    if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi
}

# --- Options: the table, --help and parsing ---

# `option NAME VALUE HELP` adds --NAME=VALUE to this launcher's options, in --help order; an empty VALUE makes
# --NAME a switch, given alone. A given option is kept in $opt_NAME.
OPTIONS=()
declare -gA OPTION_VALUE OPTION_HELP
option() {
    OPTIONS+=("$1")
    OPTION_VALUE[$1]=$2
    OPTION_HELP[$1]=$3
}

# The options of this launcher's kind and scale.
declare_options() {
    if [[ $kind == perf ]]; then
        option data_path DIR "ImageNet folder with train/ and val/ (default: synthetic data, main.py --dummy)"
    else
        option data_path DIR "ImageNet folder with train/ and val/ (required)"
    fi
    option arch NAME "network, one of main.py's -a choices (default $ARCH); an evaluated or resumed checkpoint must be of this arch"
    option device NAME "npu, gpu, cpu or auto (default auto: npu, else gpu, else cpu)"
    if [[ $scale == 1p ]]; then
        option device_id N "device to run on; also names the output folder (default \$ASCEND_DEVICE_ID or 0)"
    else
        option num_devices N "number of devices/processes, devices 0..N-1 (default $NUM_DEVICES_8P)"
        option device_list LIST "devices to use, e.g. 0,1,2,3 (default 0..num_devices-1)"
        option launcher NAME "mp (main.py --multiprocessing-distributed) or torchrun (default mp)"
    fi
    option batch_size N "global batch size (default $BATCH_PER_DEVICE per device; on CPU, perf runs use $CPU_PERF_BATCH_PER_PROCESS per process)"
    option workers N "data loader workers per process (default: main.py's, from the CPU count)"
    option amp_level LEVEL "O1, O2 (apex: Ascend apex on NPU, apex<=25.05 on GPU) or off (default $AMP_LEVEL)"
    if [[ $kind != eval ]]; then
        option lr LR "base learning rate (default $lr)"
        if [[ $kind == perf ]]; then
            option epochs N "epochs, each cut at --steps (default 1)"
        else
            option epochs N "epochs (default $EPOCHS)"
        fi
        option loss_scale SCALE "dynamic or a number (default $LOSS_SCALE)"
        option profile "" "(no value) record a window of training steps: a trace per rank in <output_root>/<id>/profile, the top operators in the log (main.py --profile; window: -- --profile-steps W,A,B)"
    fi
    case $kind in
        perf)
            option steps N "training steps measured per epoch (default $PERF_STEPS; on CPU $CPU_PERF_STEPS)"
            option fps_warmup_steps N "first steps left out of the FPS (default $PERF_FPS_WARMUP, at most a fifth of --steps, at least 1 of 2 or more)"
            ;;
        eval) option resume PATH "checkpoint to evaluate (default <output_root>/<id>/model_best.pth.tar)" ;;
        *) option resume PATH "checkpoint to resume training from (default auto: the output folder's, if it holds one)" ;;
    esac
    option output_root DIR "reports go to DIR/<id>/ (default test/output)"
}

# How option $1 is written: --name= or, for a switch, --name.
option_flag() {
    if [[ -n ${OPTION_VALUE[$1]} ]]; then echo "--$1="; else echo "--$1"; fi
}

usage() {
    local o
    echo "usage: bash test/$(basename "$0") [--option=value ...] [-- main.py flags ...]"
    echo
    echo "MnasNet ImageNet, $scale, $kind run. Options:"
    for o in "${OPTIONS[@]}"; do
        printf '  %-20s %-8s%s\n' "$(option_flag "$o")" "${OPTION_VALUE[$o]}" "${OPTION_HELP[$o]}"
    done
    printf '  %-20s %-8s%s\n' "--help" "" "this text"
    echo
    echo "Flags after -- go to main.py unchanged and win over the launcher's (e.g. -- --arch mnasnet0_5 --seed 1);"
    echo "relative paths are taken from the current folder, as the options' are."
    echo "Log: <output_root>/<id>/train_<id>.log; summary: <output_root>/<id>/<CaseName>.log;"
    echo "<id> is the device id (the first device of the list for several devices)."
}

# Turns "--key=value" arguments (and switches, "--key") into opt_<key> variables; "--" ends them, the rest goes to
# main.py as extra_args.
parse_args() {
    local arg key value o accepted
    extra_args=()
    while (($#)); do
        arg=$1
        shift
        case $arg in
            -h | --help) usage; exit 0 ;;
            --) extra_args=("$@"); break ;;
            --*=*) key=${arg%%=*} key=${key#--} value=${arg#*=} ;;
            *) key=${arg#--} value="" ;;
        esac
        if [[ -z $key || -z ${OPTION_VALUE[$key]+known} ]]; then
            accepted=""
            for o in "${OPTIONS[@]}"; do accepted+="$(option_flag "$o") "; done
            die "unknown argument '$arg'. Accepted: ${accepted}--help, and -- followed by main.py flags"
        elif [[ -z ${OPTION_VALUE[$key]} ]]; then
            [[ $arg == "--$key" ]] || die "option --$key takes no value: --$key"
            value=1
        elif [[ $arg != --*=* ]]; then
            die "option --$key needs a value: --$key=VALUE"
        fi
        printf -v "opt_$key" '%s' "$value"
    done
}

# The settings that depend neither on the device nor on other options.
apply_defaults() {
    requested_device=${opt_device:-auto}
    arch=${opt_arch-$ARCH}
    amp_level=${opt_amp_level:-$AMP_LEVEL}
    loss_scale=${opt_loss_scale:-$LOSS_SCALE}
    launcher=${opt_launcher:-mp}
    epochs=${opt_epochs:-$([[ $kind == perf ]] && echo 1 || echo $EPOCHS)}
    lr=${opt_lr:-$lr}
}

# --- Checks of the values, before anything slow: a typo costs no torch import ---

check_values() {
    local v name
    case $requested_device in
        npu | gpu | cuda | cpu | auto) ;;
        *) die "--device must be npu, gpu, cpu or auto, not '$requested_device'" ;;
    esac
    # The names themselves are main.py's to check (its -a choices); this catches what cannot be one.
    [[ $arch =~ ^[a-z][a-z0-9_]*$ ]] || die "--arch must be a network name such as $ARCH, not '$arch'"
    for v in batch_size epochs steps num_devices; do
        name=opt_$v
        if [[ -n ${!name:-} ]] && ! { is_uint "${!name}" && ((${!name} > 0)); }; then
            die "--$v must be a positive number, not '${!name}'"
        fi
    done
    for v in workers fps_warmup_steps; do
        name=opt_$v
        if [[ -n ${!name:-} ]] && ! is_uint "${!name}"; then
            die "--$v must be a number, not '${!name}'"
        fi
    done
    case $amp_level in O1 | O2 | off) ;; *) die "--amp_level must be O1, O2 or off, not '$amp_level'" ;; esac
    [[ $loss_scale == dynamic || $loss_scale =~ ^[0-9]+(\.[0-9]*)?$ ]] ||
        die "--loss_scale must be dynamic or a number, not '$loss_scale'"
    case $launcher in mp | torchrun) ;; *) die "--launcher must be mp or torchrun, not '$launcher'" ;; esac
}

# dist_timeout: the --dist-timeout main.py runs with (the last one among the flags after --, else main.py's
# default), which also bounds torchrun's rendezvous.
resolve_dist_timeout() {
    local i
    dist_timeout=$DIST_TIMEOUT
    for ((i = 0; i < ${#extra_args[@]}; i++)); do
        case ${extra_args[i]} in
            --dist-timeout=*) dist_timeout=${extra_args[i]#*=} ;;
            --dist-timeout) dist_timeout=${extra_args[i + 1]:-} ;;
        esac
    done
    { is_uint "$dist_timeout" && ((dist_timeout > 0)); } ||
        die "--dist-timeout (after --) must be a positive number of seconds, not '$dist_timeout'"
}

# --- Resolving the data, the devices and the settings (each step checks what it resolves) ---

# data_path: absolute, or empty for main.py's synthetic data (perf runs only).
resolve_data_path() {
    data_path=""
    if [[ -n ${opt_data_path:-} ]]; then
        data_path=$(abspath "$opt_data_path")
        [[ -d $data_path ]] || die "--data_path: no such folder: $data_path"
        [[ -d $data_path/train && -d $data_path/val ]] ||
            die "--data_path: $data_path must hold train/ and val/ (ImageNet folder layout)"
    elif [[ $kind != perf ]]; then
        die "--data_path=DIR is required (a folder with train/ and val/); see --help"
    fi
}

# device_list (ids joined by commas), nproc (one process per device) and device_id (the first; it names the
# output folder).
resolve_device_list() {
    local devices i
    if [[ $scale == 1p ]]; then
        device_id=${opt_device_id:-${ASCEND_DEVICE_ID:-0}}
        is_uint "$device_id" || die "--device_id must be a device number, not '$device_id'"
        device_list=$device_id
        nproc=1
    elif [[ -n ${opt_device_list:-} ]]; then
        [[ $opt_device_list =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--device_list must look like 0,1,2,3, not '$opt_device_list'"
        device_list=$opt_device_list
        IFS=, read -r -a devices <<<"$device_list"
        nproc=${#devices[@]}
        if [[ -n ${opt_num_devices:-} && $opt_num_devices != "$nproc" ]]; then
            die "--num_devices=$opt_num_devices disagrees with --device_list=$device_list ($nproc devices)"
        fi
        device_id=${devices[0]}
    else
        nproc=${opt_num_devices:-$NUM_DEVICES_8P}
        device_list=0
        for ((i = 1; i < nproc; i++)); do device_list+=",$i"; done
        device_id=0
    fi
}

# device: npu, gpu or cpu. Auto is decided here as main.py would decide it, since the device changes the
# environment and the defaults.
resolve_device() {
    # Needed before anything imports torch_npu (the auto probe too); pointless on an explicit GPU/CPU run.
    case $requested_device in npu | auto) source "$TEST_DIR/env_npu.sh" ;; esac
    case $requested_device in
        npu | cpu) device=$requested_device ;;
        gpu | cuda) device=gpu ;;
        auto)
            device=$(probe_device) ||
                die "could not import torch with $PY to pick a device; pass --device=npu|gpu|cpu"
            ;;
    esac
}

probe_device() {
    TORCH_DEVICE_BACKEND_AUTOLOAD=0 "$PY" - <<'PYEOF'
import torch
try:
    import torch_npu  # noqa: F401  (registers torch.npu)
    npu = torch.npu.is_available() and torch.npu.device_count() > 0
except Exception:  # absent, or present without a working CANN (main.py says why): not an NPU machine
    npu = False
if npu:
    print("npu")
else:
    print("gpu" if torch.cuda.is_available() else "cpu")
PYEOF
}

# batch_size (global) and steps (of a perf run): the recipe's, or on a CPU perf run a size that finishes.
resolve_batch_and_steps() {
    if [[ $kind == perf && $device == cpu ]]; then
        batch_size=${opt_batch_size:-$((CPU_PERF_BATCH_PER_PROCESS * nproc))}
        steps=${opt_steps:-$CPU_PERF_STEPS}
        if [[ -z ${opt_batch_size:-} || -z ${opt_steps:-} ]]; then
            echo "note: CPU performance run: batch $batch_size, $steps steps (--batch_size=, --steps= to change)"
        fi
    else
        batch_size=${opt_batch_size:-$((BATCH_PER_DEVICE * nproc))}
        steps=${opt_steps:-$PERF_STEPS}
    fi
    ((batch_size % nproc == 0)) || die "--batch_size=$batch_size must be a multiple of the $nproc processes"
}

# fps_warmup: the first steps of a perf run left out of the FPS. A fifth of the steps, at most PERF_FPS_WARMUP;
# at least the first step (loader start-up) when 2 or more run.
resolve_fps_warmup() {
    fps_warmup=$((steps / 5 < PERF_FPS_WARMUP ? steps / 5 : PERF_FPS_WARMUP))
    ((fps_warmup == 0 && steps > 1)) && fps_warmup=1
    fps_warmup=${opt_fps_warmup_steps:-$fps_warmup}
    ((fps_warmup < steps)) || die "--fps_warmup_steps=$fps_warmup leaves no measured step out of --steps=$steps"
}

# The run's files in <output_root>/<device_id>/, named after the case; resume: the checkpoint to resume or
# evaluate.
resolve_outputs() {
    output_root=$(abspath "${opt_output_root:-$TEST_DIR/output}")
    output_dir=$output_root/$device_id
    case_name=${NETWORK}_bs${batch_size}_${nproc}p_${kind}
    log_name=train_${device_id}.log
    log_file=$output_dir/$log_name
    summary_json=$output_dir/${case_name}.json
    case_log=$output_dir/${case_name}.log

    resume=""
    if [[ $kind == eval ]]; then
        resume=$(abspath "${opt_resume:-$output_dir/model_best.pth.tar}")
    elif [[ -n ${opt_resume:-} ]]; then
        resume=$(abspath "$opt_resume")
    fi
    if [[ -n $resume && ! -f $resume ]]; then
        die "--resume: no such checkpoint: $resume"
    fi
}

# O2 (fp16 weights, fp32 master copies) exists only in apex: Ascend apex on NPU, apex.amp on a GPU, which NVIDIA
# apex no longer ships. Refused here rather than run as O1: the two train differently.
check_amp_level() {
    [[ $amp_level == O2 ]] || return 0
    case $device in
        cpu) die "--amp_level=O2 needs apex, and apex runs on an NPU or a GPU:" \
            "on the CPU use --amp_level=O1 (bf16) or off" ;;
        gpu) "$PY" -c "import apex.amp" 2>/dev/null ||
            die "--amp_level=O2 needs apex.amp, and NVIDIA apex removed apex.amp in 2025" \
                "(25.05 was the last release with it): on a GPU use --amp_level=O1 (native torch.amp) or off" ;;
    esac
}

# --- Preparing the machine and the output folder ---

# CPU runs: a faster malloc when one is installed, and the cores shared out between the processes.
tune_cpu() {
    local lib cores
    for lib in libtcmalloc_minimal.so.4 libtcmalloc.so.4 libjemalloc.so.2; do
        lib=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {print $NF; exit}')
        if [[ -n $lib && -f $lib ]]; then
            export LD_PRELOAD=$lib${LD_PRELOAD:+:$LD_PRELOAD}
            break
        fi
    done
    cores=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / nproc > 0 ? cores / nproc : 1))}
}

# Only this run's reports are removed: the folder also holds the checkpoints of a training run.
prepare_output_dir() {
    mkdir -p "$output_dir" || die "cannot create the output folder $output_dir"
    rm -f "$log_file" "$summary_json" "$case_log" "$output_dir"/rank*.log
}

# --- The main.py command line ---

# cmd: how main.py is started, then its flags; the user's flags after -- come last, so that they win.
build_command() {
    start_command
    add_run_flags
    add_recipe_flags
    add_precision_flags
    if [[ $kind == perf ]]; then
        cmd+=(--max-steps "$steps" --fps-warmup-steps "$fps_warmup" --no-val --no-checkpoint)
    fi
    cmd+=("${extra_args[@]}")
}

# One process (1p), one per device spawned by main.py (mp) or by torchrun.
start_command() {
    if [[ $scale == 1p ]]; then
        cmd=("$PY" -u "$REPO_DIR/main.py")
    elif [[ $launcher == torchrun ]]; then
        # torchrun's rendezvous waits 600 s by default before main.py runs: bounded like main.py's own waits.
        cmd=("$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$nproc"
            --rdzv-conf "join_timeout=$dist_timeout" "$REPO_DIR/main.py")
    else
        # main.py spawns one process per device; MASTER_ADDR/MASTER_PORT if set, else a free local port.
        cmd=("$PY" -u "$REPO_DIR/main.py" --multiprocessing-distributed)
    fi
}

# The data, network, devices, batch and where the reports go.
add_run_flags() {
    if [[ -n $data_path ]]; then
        cmd+=("$data_path")
    else
        cmd+=(--dummy)
    fi
    cmd+=(--arch "$arch" --device "$device" --device-list "$device_list" --batch-size "$batch_size" --print-freq 10
        --output-dir "$output_dir" --log-file "$log_name" --summary-json "$summary_json")
    if [[ -n ${opt_workers:-} ]]; then cmd+=(--workers "$opt_workers"); fi
    if [[ -n ${opt_profile:-} ]]; then cmd+=(--profile); fi
}

# The published recipe, or the checkpoint to evaluate. An accuracy run's folder is the same for every run of its
# <id>: run again (after a pre-emption, a requeue), it continues the checkpoint there (main.py --resume auto), which
# main.py would otherwise refuse to replace. Performance runs write no checkpoint and always start anew.
add_recipe_flags() {
    if [[ $kind == eval ]]; then
        cmd+=(--evaluate --resume "$resume")
        return
    fi
    cmd+=(--epochs "$epochs" --lr "$lr" --warmup "$WARMUP_EPOCHS" --momentum "$MOMENTUM" --nesterov
        --weight-decay "$WEIGHT_DECAY" --label-smoothing "$LABEL_SMOOTHING" --bn-momentum "$BN_MOMENTUM")
    if [[ -n $resume ]]; then
        cmd+=(--resume "$resume")
    elif [[ $kind == acc ]]; then
        cmd+=(--resume auto)
    fi
}

add_precision_flags() {
    [[ $amp_level != off ]] || return 0
    cmd+=(--amp --opt-level "$amp_level")
    # O2 (fp16 weights, fp32 master copies) exists only in apex; O1 is torch.amp's autocast.
    if [[ $amp_level == O2 ]]; then cmd+=(--amp-backend apex); fi
    if [[ $kind != eval ]]; then cmd+=(--loss-scale "$loss_scale"); fi
}

# --- Running it and the summary ---

# Runs main.py (it, or torchrun, starts the process of each rank); stops with its status if it fails.
run_main() {
    local line rc
    # torchrun imports torch before main.py runs: without this, a torch_npu that cannot load (CANN not sourced)
    # would end the run at `import torch`. main.py imports torch_npu itself when the run is on an NPU.
    export TORCH_DEVICE_BACKEND_AUTOLOAD=0
    echo "$case_name on $device ($device_list), log: $log_file"
    printf -v line '%q ' "${cmd[@]}"
    echo "running: ${line% }"
    if [[ $scale != 1p && $launcher == torchrun ]]; then
        echo "torchrun: waiting at most $dist_timeout s (--dist-timeout) for 1 node of $nproc processes," \
            "rendezvous on this host (--standalone)"
    fi

    "${cmd[@]}"
    rc=$?
    if ((rc != 0)); then
        echo "error: main.py exited with status $rc; see $log_file" >&2
        exit "$rc"
    fi
    [[ -f $summary_json ]] || { echo "error: main.py wrote no summary $summary_json" >&2; exit 1; }
}

# Writes <CaseName>.log from main.py's summary JSON and prints the final block; $1: the run's seconds.
report() {
    "$PY" "$TEST_DIR/summary.py" "$summary_json" "$case_log" "$kind" "$NETWORK" "$case_name" "$1" ||
        { echo "error: could not read the summary $summary_json" >&2; exit 1; }
}
