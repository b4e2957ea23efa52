# shellcheck shell=bash disable=SC2154  # kind, scale and lr are set by the launcher that sources this
# Shared logic of the test/train_*.sh launchers; sourced, never run.
# A launcher sets the recipe of its case and calls `launch "$@"`:
#   kind=acc|perf|eval   scale=1p|8p   lr=<base learning rate>
# Everything else (argument parsing, checks, environment, the main.py command line, the reports) is here.

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
PERF_STEPS=1000
PERF_FPS_WARMUP=20
# A CPU can't run the recipe's batch in reasonable time; perf runs there default to this.
CPU_PERF_BATCH_PER_PROCESS=16
CPU_PERF_STEPS=20

TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$TEST_DIR")
PY=${PYTHON:-python3}

die() {
    echo "error: $*" >&2
    exit 2
}

# Options given without a value (--name alone); all others are --name=value.
SWITCHES=" profile "

# Options each launcher accepts, by kind and scale.
accepted_options() {
    local opts=(data_path arch device)
    if [[ $scale == 1p ]]; then
        opts+=(device_id)
    else
        opts+=(num_devices device_list launcher)
    fi
    opts+=(batch_size workers amp_level)
    if [[ $kind != eval ]]; then
        opts+=(lr epochs loss_scale profile)
    fi
    case $kind in
        perf) opts+=(steps fps_warmup_steps) ;;
        *) opts+=(resume) ;;
    esac
    opts+=(output_root)
    echo "${opts[@]}"
}

describe_option() {
    case $1 in
        data_path) if [[ $kind == perf ]]; then
                       echo "DIR     ImageNet folder with train/ and val/ (default: synthetic data, main.py --dummy)"
                   else
                       echo "DIR     ImageNet folder with train/ and val/ (required)"
                   fi ;;
        arch) echo "NAME    network, one of main.py's -a choices (default $ARCH); a resumed or evaluated checkpoint's own" ;;
        device) echo "NAME    npu, gpu, cpu or auto (default auto: npu, else gpu, else cpu)" ;;
        device_id) echo "N       device to run on; also names the output folder (default \$ASCEND_DEVICE_ID or 0)" ;;
        num_devices) echo "N       number of devices/processes, devices 0..N-1 (default 8)" ;;
        device_list) echo "LIST    devices to use, e.g. 0,1,2,3 (default 0..num_devices-1)" ;;
        launcher) echo "NAME    mp (main.py --multiprocessing-distributed) or torchrun (default mp)" ;;
        batch_size) echo "N       global batch size (default 512 per device; on CPU, perf runs use $CPU_PERF_BATCH_PER_PROCESS per process)" ;;
        workers) echo "N       data loader workers per process (default: main.py's, from the CPU count)" ;;
        amp_level) echo "LEVEL   O1, O2 (apex: Ascend apex on NPU, apex<=25.05 on GPU) or off (default O1)" ;;
        lr) echo "LR      base learning rate (default $lr)" ;;
        epochs) if [[ $kind == perf ]]; then
                    echo "N       epochs, each cut at --steps (default 1)"
                else
                    echo "N       epochs (default $EPOCHS)"
                fi ;;
        loss_scale) echo "SCALE   dynamic or a number (default dynamic)" ;;
        steps) echo "N       training steps measured per epoch (default $PERF_STEPS; on CPU $CPU_PERF_STEPS)" ;;
        fps_warmup_steps) echo "N       first steps left out of the FPS (default $PERF_FPS_WARMUP, at most a fifth of --steps, at least 1 of 2 or more)" ;;
        resume) if [[ $kind == eval ]]; then
                    echo "PATH    checkpoint to evaluate (default <output_root>/<id>/model_best.pth.tar)"
                else
                    echo "PATH    checkpoint to resume training from"
                fi ;;
        output_root) echo "DIR     reports go to DIR/<id>/ (default test/output)" ;;
        profile) echo "        (no value) record a window of training steps: a trace per rank in <output_root>/<id>/profile, the top operators in the log (main.py --profile; window: -- --profile-steps W,A,B)" ;;
    esac
}

usage() {
    local o
    echo "usage: bash test/$(basename "$0") [--option=value ...] [-- main.py flags ...]"
    echo
    echo "MnasNet ImageNet, $scale, $kind run. Options:"
    for o in $(accepted_options); do
        if [[ $SWITCHES == *" $o "* ]]; then
            printf '  --%-18s %s\n' "$o" "$(describe_option "$o")"
        else
            printf '  --%-18s %s\n' "$o=" "$(describe_option "$o")"
        fi
    done
    printf '  --%-18s %s\n' "help" "        this text"
    echo
    echo "Flags after -- go to main.py unchanged and win over the launcher's (e.g. -- --arch mnasnet0_5 --seed 1);"
    echo "relative paths are taken from the current folder, as the options' are."
    echo "Log: <output_root>/<id>/train_<id>.log; summary: <output_root>/<id>/<CaseName>.log;"
    echo "<id> is the device id (the first device of the list for several devices)."
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# Turns "--key=value" arguments into opt_<key> variables; "--" ends them, the rest goes to main.py.
parse_args() {
    local arg key value accepted accepted_list
    accepted=" $(accepted_options) "
    extra_args=()
    while (($#)); do
        arg=$1
        shift
        case $arg in
            -h | --help)
                usage
                exit 0
                ;;
            --)
                extra_args=("$@")
                break
                ;;
            --*=*)
                key=${arg%%=*}
                key=${key#--}
                value=${arg#*=}
                ;;
            *)
                key=${arg#--}
                ;;
        esac
        if [[ $accepted == *" $key "* && $SWITCHES == *" $key "* ]]; then
            [[ $arg == "--$key" ]] || die "option --$key takes no value: --$key"
            printf -v "opt_$key" '%s' 1
            continue
        fi
        if [[ $accepted != *" $key "* || $arg != --*=* ]]; then
            if [[ $accepted == *" $key "* ]]; then
                die "option --$key needs a value: --$key=VALUE"
            fi
            read -r -a accepted_list <<<"$accepted"
            die "unknown argument '$arg'. Accepted: $(for o in "${accepted_list[@]}"; do
                if [[ $SWITCHES == *" $o "* ]]; then printf -- '--%s ' "$o"; else printf -- '--%s= ' "$o"; fi
            done)--help, and -- followed by main.py flags"
        fi
        printf -v "opt_$key" '%s' "$value"
    done
}

# Absolute path of $1 taken relative to the caller's working directory.
abspath() {
    if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi
}

resolve_device() {
    case ${opt_device:-auto} in
        npu | cpu) device=$opt_device ;;
        gpu | cuda) device=gpu ;;
        auto)
            # What main.py's auto would pick, decided here too: it changes the environment and defaults.
            device=$(TORCH_DEVICE_BACKEND_AUTOLOAD=0 "$PY" - <<'PYEOF'
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
            ) || die "could not import torch with $PY to pick a device; pass --device=npu|gpu|cpu"
            ;;
    esac
}

resolve_devices() {
    local n i
    if [[ $scale == 1p ]]; then
        device_id=${opt_device_id:-${ASCEND_DEVICE_ID:-0}}
        is_uint "$device_id" || die "--device_id must be a device number, not '$device_id'"
        device_list=$device_id
        nproc=1
        return
    fi
    if [[ -n ${opt_device_list:-} ]]; then
        [[ $opt_device_list =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--device_list must look like 0,1,2,3, not '$opt_device_list'"
        device_list=$opt_device_list
        IFS=, read -r -a _devs <<<"$device_list"
        nproc=${#_devs[@]}
        if [[ -n ${opt_num_devices:-} && $opt_num_devices != "$nproc" ]]; then
            die "--num_devices=$opt_num_devices disagrees with --device_list=$device_list ($nproc devices)"
        fi
        device_id=${_devs[0]}
    else
        n=${opt_num_devices:-8}
        if ! is_uint "$n" || ((n == 0)); then
            die "--num_devices must be a positive number, not '$n'"
        fi
        device_list=0
        for ((i = 1; i < n; i++)); do device_list+=",$i"; done
        nproc=$n
        device_id=0
    fi
}

check_data_path() {
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

# Checks what can be checked without Python, so that a typo costs no torch import.
check_values() {
    local v
    case ${opt_device:-auto} in npu | gpu | cuda | cpu | auto) ;; *) die "--device must be npu, gpu, cpu or auto, not '$opt_device'" ;; esac
    # The names themselves are main.py's to check (its -a choices); this catches what cannot be one.
    [[ ${opt_arch-$ARCH} =~ ^[a-z][a-z0-9_]*$ ]] || die "--arch must be a network name such as $ARCH, not '$opt_arch'"
    for v in batch_size epochs steps num_devices; do
        local name=opt_$v
        if [[ -n ${!name:-} ]] && ! { is_uint "${!name}" && ((${!name} > 0)); }; then
            die "--$v must be a positive number, not '${!name}'"
        fi
    done
    for v in workers fps_warmup_steps; do
        local name=opt_$v
        if [[ -n ${!name:-} ]] && ! is_uint "${!name}"; then
            die "--$v must be a number, not '${!name}'"
        fi
    done
    case ${opt_amp_level:-O1} in O1 | O2 | off) ;; *) die "--amp_level must be O1, O2 or off, not '$opt_amp_level'" ;; esac
    [[ ${opt_loss_scale:-dynamic} == dynamic || $opt_loss_scale =~ ^[0-9]+(\.[0-9]*)?$ ]] ||
        die "--loss_scale must be dynamic or a number, not '$opt_loss_scale'"
    case ${opt_launcher:-mp} in mp | torchrun) ;; *) die "--launcher must be mp or torchrun, not '$opt_launcher'" ;; esac
}

# Fills in the defaults of the case, some of which depend on the device.
resolve_settings() {
    batch_size=${opt_batch_size:-$((BATCH_PER_DEVICE * nproc))}
    steps=${opt_steps:-$PERF_STEPS}
    if [[ $kind == perf && $device == cpu ]]; then
        batch_size=${opt_batch_size:-$((CPU_PERF_BATCH_PER_PROCESS * nproc))}
        steps=${opt_steps:-$CPU_PERF_STEPS}
        if [[ -z ${opt_batch_size:-} || -z ${opt_steps:-} ]]; then
            echo "note: CPU performance run: batch $batch_size, $steps steps (--batch_size=, --steps= to change)"
        fi
    fi
    ((batch_size % nproc == 0)) || die "--batch_size=$batch_size must be a multiple of the $nproc processes"
    # A fifth of the steps, at most PERF_FPS_WARMUP; at least the first step (loader start-up) when 2 or more run.
    fps_warmup=$((steps / 5 < PERF_FPS_WARMUP ? steps / 5 : PERF_FPS_WARMUP))
    ((fps_warmup == 0 && steps > 1)) && fps_warmup=1
    fps_warmup=${opt_fps_warmup_steps:-$fps_warmup}
    ((fps_warmup < steps)) || die "--fps_warmup_steps=$fps_warmup leaves no measured step out of --steps=$steps"
    epochs=${opt_epochs:-$([[ $kind == perf ]] && echo 1 || echo $EPOCHS)}
    lr=${opt_lr:-$lr}

    amp_level=${opt_amp_level:-O1}
    loss_scale=${opt_loss_scale:-dynamic}
    launcher=${opt_launcher:-mp}

    output_root=$(abspath "${opt_output_root:-$TEST_DIR/output}")
    output_dir=$output_root/$device_id
    case_name=${NETWORK}_bs${batch_size}_${nproc}p_${kind}

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

build_command() {
    local main_args=()
    if [[ -n $data_path ]]; then
        main_args+=("$data_path")
    else
        main_args+=(--dummy)
    fi
    main_args+=(--arch "${opt_arch:-$ARCH}" --device "$device" --device-list "$device_list"
        --batch-size "$batch_size" --print-freq 10
        --output-dir "$output_dir" --log-file "train_${device_id}.log" --summary-json "$summary_json")
    [[ -n ${opt_workers:-} ]] && main_args+=(--workers "$opt_workers")
    [[ -n ${opt_profile:-} ]] && main_args+=(--profile)
    if [[ $kind == eval ]]; then
        main_args+=(--evaluate --resume "$resume")
    else
        main_args+=(--epochs "$epochs" --lr "$lr" --warmup "$WARMUP_EPOCHS" --momentum "$MOMENTUM" --nesterov
            --weight-decay "$WEIGHT_DECAY" --label-smoothing "$LABEL_SMOOTHING" --bn-momentum "$BN_MOMENTUM")
        [[ -n $resume ]] && main_args+=(--resume "$resume")
    fi
    if [[ $amp_level != off ]]; then
        main_args+=(--amp --opt-level "$amp_level")
        # O2 (fp16 weights, fp32 master copies) exists only in apex; O1 is torch.amp's autocast.
        [[ $amp_level == O2 ]] && main_args+=(--amp-backend apex)
        [[ $kind != eval ]] && main_args+=(--loss-scale "$loss_scale")
    fi
    if [[ $kind == perf ]]; then
        main_args+=(--max-steps "$steps" --fps-warmup-steps "$fps_warmup" --no-val --no-checkpoint)
    fi

    if [[ $scale == 1p ]]; then
        cmd=("$PY" -u "$REPO_DIR/main.py")
    elif [[ $launcher == torchrun ]]; then
        cmd=("$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$nproc" "$REPO_DIR/main.py")
    else
        # main.py spawns one process per device; MASTER_ADDR/MASTER_PORT if set, else a free local port.
        cmd=("$PY" -u "$REPO_DIR/main.py" --multiprocessing-distributed)
    fi
    cmd+=("${main_args[@]}" "${extra_args[@]}")
}

# Reads main.py's summary JSON; writes <CaseName>.log and prints the final block.
report() {
    local e2e=$1
    "$PY" - "$summary_json" "$case_log" "$kind" "$NETWORK" "$case_name" "$e2e" <<'PYEOF'
import json
import platform
import sys

summary_path, case_log, kind, network, case_name, e2e = sys.argv[1:]
with open(summary_path) as f:
    s = json.load(f)


def fixed(value, digits):
    return "None" if value is None else f"{value:.{digits}f}"


# The final Acc@1 main.py reports: validation when there was one (eval runs: only that), else training.
accuracy = s["val_acc1"] if s.get("val_acc1") is not None else s.get("train_acc1")
loss = s.get("val_loss") if kind == "eval" else s.get("train_loss")
fields = [
    ("Network", network),
    ("RankSize", s["world_size"]),
    ("BatchSize", s["batch_size"]),
    ("DeviceType", platform.machine()),
    ("CaseName", case_name),
]
if kind != "eval":
    # Mean over the measured window; none when every epoch was shorter than main.py's FPS warm-up.
    fps = step_ms = None
    if s.get("measured_steps") and s.get("measured_seconds"):
        fps = s["measured_images"] / s["measured_seconds"]
        step_ms = 1000.0 * s["measured_seconds"] / s["measured_steps"]
    fields += [("ActualFPS", fixed(fps, 2)), ("TrainingTime", fixed(step_ms, 2))]
    # The share of the mean step spent waiting for the loader (main.py's data_ms over the whole step).
    fields += [("DataWaitShare", fixed(s.get("data_wait_share"), 3))]
fields += [
    ("TrainAccuracy", fixed(accuracy, 3)),
    ("ActualLoss", fixed(loss, 4)),
    ("E2ETrainingTime", e2e),
    ("Device", s["device_type"]),
]
with open(case_log, "w") as f:
    f.writelines(f"{key} = {value}\n" for key, value in fields)

values = dict(fields)
print("------------------ Final result ------------------")
if kind != "eval":
    print(f"Final Performance images/sec : {values['ActualFPS']}")
print(f"Final Train Accuracy : {values['TrainAccuracy']}")
print(f"E2E Training Duration sec : {e2e}")
print(f"Summary : {case_log}")
PYEOF
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

launch() {
    local start rc line
    start=$(date +%s)
    parse_args "$@"
    check_values
    check_data_path
    resolve_devices
    # Needed before anything imports torch_npu (the auto probe too); pointless on an explicit GPU/CPU run.
    case ${opt_device:-auto} in npu | auto) source "$TEST_DIR/env_npu.sh" ;; esac
    resolve_device
    resolve_settings
    check_amp_level
    [[ $device == cpu ]] && tune_cpu

    mkdir -p "$output_dir" || die "cannot create the output folder $output_dir"
    # Only this run's reports are removed: the folder also holds the checkpoints of a training run.
    log_file=$output_dir/train_${device_id}.log
    summary_json=$output_dir/${case_name}.json
    case_log=$output_dir/${case_name}.log
    rm -f "$log_file" "$summary_json" "$case_log" "$output_dir"/rank*.log

    build_command
    # torchrun imports torch before main.py runs: without this, a torch_npu that cannot load (CANN not sourced)
    # would end the run at `import torch`. main.py imports torch_npu itself when the run is on an NPU.
    export TORCH_DEVICE_BACKEND_AUTOLOAD=0
    echo "$case_name on $device ($device_list), log: $log_file"
    printf -v line '%q ' "${cmd[@]}"
    echo "running: ${line% }"

    "${cmd[@]}"
    rc=$?
    if ((rc != 0)); then
        echo "error: main.py exited with status $rc; see $log_file" >&2
        exit "$rc"
    fi
    [[ -f $summary_json ]] || { echo "error: main.py wrote no summary $summary_json" >&2; exit 1; }
    report $(($(date +%s) - start)) || { echo "error: could not read the summary $summary_json" >&2; exit 1; }
}
