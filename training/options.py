"""main.py's command line: its options (``build_parser``, ``parse_args``), what the command line alone decides
(``check_args``, which changes nothing) and what the run needs from this machine before any process starts
(``prepare``, which sets the derived settings), so that a mistake costs one line, not a traceback."""
from training import autoload_off  # noqa: F401  # isort: skip  (before torch: see training/autoload_off.py)

import argparse
import os

import mnasnet
from training import (checkpoint, data, demo, devices, distributed, metrics, named_weights, pipeline, profiling,
                      transforms)
from training.precision import import_apex_amp
from training.utils import UserError


def build_parser():
    parser = argparse.ArgumentParser(description="MnasNet ImageNet training (NPU / GPU / CPU)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", nargs="?", metavar="DIR",
                        help="ImageNet folder with train/ and val/; omitted: the scikit-learn digits demo")
    parser.add_argument("-a", "--arch", default="mnasnet1_0", choices=sorted(mnasnet.ARCHS))
    parser.add_argument("--dropout", default=0.2, type=float)
    parser.add_argument("--bn-momentum", default=0.1, type=float,
                        help="BatchNorm momentum, PyTorch's default; lower values (0.01 TF's, 0.0003 torchvision's) "
                             "suit long runs only: in a few hundred steps they leave the statistics that "
                             "validation uses near their initial values")

    add_data_options(parser)
    add_optimisation_options(parser)
    add_device_options(parser)
    add_precision_options(parser)
    add_output_options(parser)
    return parser


def add_data_options(parser):
    """Where the images come from and how they are decoded, augmented and mixed."""
    group = parser.add_argument_group("data")
    group.add_argument("-j", "--workers", default=None, type=int,
                       help="loader workers per process; unset: from the CPUs per process")
    group.add_argument("--dummy", action="store_true", help="synthetic ImageNet-sized data, no DIR needed")
    group.add_argument("--dummy-images", default=1281167, type=int, help="training images in --dummy mode")
    group.add_argument("--train-crop-size", default=224, type=int)
    group.add_argument("--min-crop-scale", default=0.08, type=float, help="RandomResizedCrop's smallest area")
    group.add_argument("--val-resize-size", default=256, type=int,
                       help="validation resizes the shorter side to this; unset with --crop-pct or named "
                            "--pretrained weights: floor(--val-crop-size / crop pct)")
    group.add_argument("--val-crop-size", default=224, type=int, help="validation's centre crop")
    group.add_argument("--crop-pct", default=None, type=float,
                       help="timm's crop fraction: sets --val-resize-size to floor(--val-crop-size / CROP_PCT) "
                            "(0.875: 256 for 224); giving both that disagree is an error")
    group.add_argument("--interpolation", default="bilinear", choices=transforms.INTERPOLATIONS,
                       help="validation's resize; named --pretrained weights set their own unless given")
    group.add_argument("--auto-augment", default=None, choices=sorted(transforms.AUTO_AUGMENT),
                       help="ta_wide: TrivialAugmentWide, ra: RandAugment (torchvision.transforms.v2)")
    group.add_argument("--random-erase", default=0.0, type=float, help="RandomErasing probability")
    group.add_argument("--mixup", default=0.0, type=float, help="MixUp alpha (0: off)")
    group.add_argument("--cutmix", default=0.0, type=float, help="CutMix alpha (0: off); with --mixup, one per batch")
    group.add_argument("--strict-data", action="store_true",
                       help="an unreadable image is an error (default: logged once, replaced in training, "
                            "left out of validation, counted)")
    group.add_argument("--pipeline", default="fast", choices=pipeline.PIPELINES,
                       help="input pipeline: fast (large JPEG crops decoded at reduced size by PIL draft(), others "
                            "by torchvision.io; uint8 batches normalised on the device), standard (torchvision PIL "
                            "transforms, float batches), tensor (torchvision.io decode), gpu (JPEG decode and "
                            "augmentation on the CUDA device)")
    group.add_argument("--fast-val", action="store_true",
                       help="validation through the --pipeline's fast path too (otherwise standard PIL pixels)")


def add_optimisation_options(parser):
    """The optimizer, its schedule, the EMA and when non-finite gradients stop a run."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", default=90, type=int)
    group.add_argument("--start-epoch", default=None, type=int,
                       help="epoch a fresh run starts at, with the LR schedule where an uninterrupted run has it "
                            "(unset: 0); a --resume checkpoint's epoch wins")
    group.add_argument("-b", "--batch-size", default=256, type=int, help="GLOBAL batch, split across processes")
    group.add_argument("--lr", "--learning-rate", default=0.1, type=float)
    group.add_argument("--momentum", default=0.9, type=float)
    group.add_argument("--nesterov", action="store_true")
    group.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay")
    group.add_argument("--decay-norm-and-bias", action="store_true",
                       help="also apply weight decay to BatchNorm parameters and biases")
    group.add_argument("--label-smoothing", default=0.1, type=float)
    group.add_argument("--warmup", default=0, type=float, help="linear warm-up epochs from 0.1x the LR")
    group.add_argument("--max-steps", default=0, type=int, help="stop each epoch after N steps (0: whole epoch)")
    group.add_argument("--opt", default="sgd", choices=["sgd", "rmsprop"],
                       help="rmsprop: TensorFlow's, as in the MnasNet paper (eps inside the square root)")
    group.add_argument("--rmsprop-decay", default=0.9, type=float)
    group.add_argument("--opt-eps", default=1e-3, type=float, help="RMSProp epsilon")
    group.add_argument("--lr-scheduler", default="cosine", choices=["cosine", "step", "exponential"],
                       help="after --warmup; step and exponential decay by --lr-decay-rate every --lr-decay-epochs")
    group.add_argument("--lr-decay-epochs", default=None, type=float, help="unset: 30 (step), 2.4 (exponential)")
    group.add_argument("--lr-decay-rate", default=None, type=float, help="unset: 0.1 (step), 0.97 (exponential)")
    group.add_argument("--model-ema", action="store_true",
                       help="also keep, validate and checkpoint an EMA of the weights and BatchNorm statistics")
    group.add_argument("--model-ema-decay", default=0.9999, type=float, help="EMA decay per training step")
    group.add_argument("--model-ema-steps", default=32, type=int, help="update the EMA every N steps")
    group.add_argument("--max-nonfinite-steps", default=20, type=int,
                       help="with a loss scaler (fp16 --amp, native or apex), stop after N steps in a row with "
                            "non-finite gradients; without one the first such step stops the run")


def add_device_options(parser):
    """Which devices, how the processes meet, and what runs on the device."""
    group = parser.add_argument_group("devices and distributed")
    group.add_argument("--device", default="auto", choices=["auto", "npu", "gpu", "cuda", "cpu"])
    group.add_argument("--device-list", default=None, help="device ids, e.g. 0,1,2,3; unset: 0, or every device "
                                                          "with --multiprocessing-distributed, torchrun or srun")
    group.add_argument("--multiprocessing-distributed", action="store_true",
                       help="one process per --device-list entry on this node")
    group.add_argument("--world-size", default=1, type=int, help="number of nodes (with --multiprocessing-distributed)")
    group.add_argument("--rank", default=0, type=int, help="this node's rank (with --multiprocessing-distributed)")
    group.add_argument("--dist-url", default="env://",
                       help="rendezvous; env:// reads MASTER_ADDR/MASTER_PORT (srun tasks without MASTER_PORT: "
                            "10000 + SLURM_JOB_ID %% 20000)")
    group.add_argument("--dist-backend", default=None, help="default: hccl on NPU, nccl on CUDA, gloo on CPU")
    group.add_argument("--dist-timeout", default=1800, type=int,
                       help="seconds before a stuck collective, or a rendezvous that does not complete, fails")
    group.add_argument("--local_rank", "--local-rank", default=None, type=int,
                       help="accepted for torch.distributed.launch; LOCAL_RANK from the environment wins")
    group.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes")
    group.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile the model for training (CUDA; no faster on the CPU) and, with -e, the "
                            "evaluated copy with its weights frozen in (CUDA, CPU); BACKEND defaults to inductor")
    group.add_argument("--fuse-bn", default=True, action=argparse.BooleanOptionalAction,
                       help="validate a copy with BatchNorm folded into the convolutions (faster, same function)")
    group.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                       help="auto: channels_last on CUDA and CPU, contiguous on NPU")


def add_precision_options(parser):
    """Mixed precision, and the kernel settings logged at start-up."""
    group = parser.add_argument_group("mixed precision")
    group.add_argument("--amp", action="store_true", help="mixed precision in --amp-dtype")
    group.add_argument("--amp-dtype", default="auto", choices=["auto", "float16", "bfloat16"],
                       help="auto: float16 on NPU/CUDA, bfloat16 on a CPU that computes it natively (fp32 on other "
                            "CPUs); float16 always runs with a loss scaler, also on the CPU (slow there: for tests)")
    group.add_argument("--amp-backend", default="native", choices=["native", "apex"])
    group.add_argument("--opt-level", default="O1", choices=["O1", "O2"], help="apex opt level")
    group.add_argument("--loss-scale", default="dynamic",
                       help="'dynamic' or a fixed value such as 128 (never changed; overflowing steps are skipped)")
    group.add_argument("--init-loss-scale", default=2.0 ** 16, type=float,
                       help="the first value of a dynamic --loss-scale (GradScaler's and apex's default)")

    group = parser.add_argument_group("kernel settings (logged at start-up as '=> kernel settings: ...')")
    group.add_argument("--npu-jit-compile", default="auto", choices=["auto", "on", "off"],
                       help="NPU: compile operators online (on) or use CANN's prebuilt binary kernels (off: first "
                            "steps in seconds, not minutes); auto: torch_npu's default for the chip (on for Atlas "
                            "training/inference series, off for Atlas A2/A3)")
    group.add_argument("--npu-internal-format", default="auto", choices=["auto", "on", "off"],
                       help="NPU: let operators keep tensors in the NPU's private layouts (NC1HWC0, FRACTAL_Z); "
                            "auto: torch_npu's default for the chip")
    group.add_argument("--tf32", "--hf32", default="auto", choices=["auto", "on", "off"],
                       help="fp32 convolutions and matmuls on TF32 tensor cores (CUDA) / in HF32 (NPU): on for "
                            "both, off for neither; auto: the libraries' defaults, convolutions on, matmuls off")
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic kernels (cuDNN, torch.use_deterministic_algorithms, warning for operators "
                            "that have none; HCCL's reductions on NPU): a rerun repeats the run bit for bit, slower")


def add_output_options(parser):
    """Checkpoints, evaluation, and what a run writes and logs."""
    group = parser.add_argument_group("checkpoints, evaluation and output")
    group.add_argument("--resume", default="", metavar="PATH",
                       help="continue from this checkpoint; auto: from --output-dir's checkpoint when it holds one "
                            "(of a run with the same -a, -b and classes), else start a new run (requeued jobs)")
    group.add_argument("-e", "--evaluate", action="store_true", help="only validate --resume/--pretrained weights")
    group.add_argument("--pretrained", default="", metavar="PATH",
                       help="start from these weights: a file (ours, torchvision's), or 'torchvision' / 'timm' for "
                            "that library's published weights of -a (downloaded once into its cache), validated "
                            "with their own resize, crop and interpolation unless those flags are given")
    group.add_argument("--no-val", action="store_true", help="skip validation (performance runs)")
    group.add_argument("--no-checkpoint", action="store_true",
                       help="write no checkpoints (performance runs, which must not replace a real run's)")
    group.add_argument("--save-every-minutes", default=30.0, type=float, metavar="M",
                       help="also write the checkpoint mid-epoch once M minutes have passed since the last save, "
                            "so that a node that dies without a signal loses about M minutes at most; 0: off")
    group.add_argument("--seed", default=None, type=int)
    group.add_argument("-p", "--print-freq", default=10, type=int)
    group.add_argument("--fps-warmup-steps", default=5, type=int,
                       help="steps per epoch left out of the FPS and of the data/copy/compute split")
    group.add_argument("--output-dir", default="output", help="logs and checkpoints")
    group.add_argument("--log-file", default="train.log", help="rank 0's log, inside --output-dir")
    group.add_argument("--summary-json", default="", metavar="PATH", help="write the run's figures as JSON")
    group.add_argument("--tensorboard", action="store_true",
                       help="also write the per-epoch metrics as TensorBoard scalars in <output-dir>/tensorboard")
    group.add_argument("--profile", action="store_true",
                       help="record a window of the first epoch's training steps with the device's profiler "
                            "(torch.profiler; torch_npu.profiler on NPU): a TensorBoard trace per rank in "
                            f"<output-dir>/{profiling.TRACE_FOLDER}, rank 0's top operators in its log")
    group.add_argument("--profile-steps", default="5,2,5", metavar="WAIT,WARMUP,ACTIVE",
                       help="--profile's window: skip WAIT steps, warm the profiler up for WARMUP, record ACTIVE")


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is None and not args.dummy:
        # No data set given: the short demo run, unless the user set a flag explicitly.
        parser.set_defaults(**demo.DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    args.explicit_options = explicit_options(argv, vars(args))
    return args


def explicit_options(argv, dests):
    """The dests the command line sets (a default does not count): a resumed run takes a given --lr."""
    unset = object()
    probe = build_parser()
    probe.set_defaults(**dict.fromkeys(dests, unset))
    return sorted(dest for dest, value in vars(probe.parse_args(argv)).items() if value is not unset)


def check_args(args):
    """Everything the command line alone decides, checked before anything is created, imported or downloaded, so
    that a mistake costs one line, not a traceback. Changes nothing: prepare() derives the run's settings."""
    check_values(args)
    check_weights(args)
    check_combinations(args)
    if args.tensorboard:
        metrics.tensorboard_writer_class()


def prepare(args):
    """What the run needs from this machine, after check_args: the device kind (importing torch_npu, or apex),
    the output folder (created), the data folder (the demo's written into it), the named weights (fetched once
    here rather than in every process at once). Each may fail with one line.

    The settings derived from the command line are set on ``args`` here and nowhere else: ``device_kind``,
    ``device_ids``, ``data_dir`` (None with --dummy), ``named_weights`` (None or the published weights),
    ``val_preprocessing`` (the log's line; validation's crop, resize and interpolation follow the weights unless
    given), ``profile_window``; and ``fuse_bn`` is off under apex. Returns ``args``."""
    args.profile_window = profiling.parse_steps(args.profile_steps)
    args.named_weights = named_weights.resolve(args.pretrained, args.arch) if is_named(args.pretrained) else None
    args.val_preprocessing = choose_val_preprocessing(args, args.named_weights)
    args.device_kind = devices.resolve_device_kind(args.device)
    check_devices(args)
    if args.amp and args.amp_backend == "apex":
        import_apex_amp(args.device_kind)
        args.fuse_bn = False  # apex patches the model's forward with its casts; a traced copy would lose them
    args.device_ids = device_ids(args)
    distributed.check_distributed_args(args)
    args.data_dir = data_folder(args)
    args.output_dir = run_output_dir(args)
    check_output_dir(args)
    if args.named_weights is not None:
        named_weights.fetch(args.named_weights)
    return args


def check_values(args):
    """Each number in its range, --loss-scale and --profile-steps readable, the options given together fit."""
    for name in ("epochs", "batch_size", "print_freq", "model_ema_steps", "max_nonfinite_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_steps", "fps_warmup_steps"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be at least 0")
    if args.save_every_minutes < 0:
        raise UserError("--save-every-minutes must be at least 0 (0: no mid-epoch saves)")
    if args.workers is not None and args.workers < 0:
        raise UserError("-j/--workers must be at least 0")
    if args.amp and args.amp_backend == "native" and args.opt_level == "O2":
        raise UserError("--opt-level O2 (fp16 weights with fp32 master copies) needs --amp-backend apex; "
                        "native torch.amp is O1-style autocast")
    if args.model_ema and args.amp and args.amp_backend == "apex" and args.opt_level == "O2":
        raise UserError("--model-ema averages fp32 weights; apex O2 keeps fp16 ones: use --opt-level O1")
    if not 0 <= args.random_erase <= 1 or args.mixup < 0 or args.cutmix < 0:
        raise UserError("--random-erase must be a probability in [0, 1]; --mixup and --cutmix alphas at least 0")
    check_precision(args)
    if args.start_epoch is not None and not 0 <= args.start_epoch < args.epochs:
        raise UserError(f"--start-epoch {args.start_epoch} must be at least 0 and below --epochs {args.epochs}")
    profiling.parse_steps(args.profile_steps)
    if args.profile and args.evaluate:
        raise UserError("--profile records training steps; -e/--evaluate trains none")
    if "profile_steps" in args.explicit_options and not args.profile:
        raise UserError("--profile-steps sets the window of --profile: add --profile")


def check_precision(args):
    """--amp-dtype, --loss-scale and --init-loss-scale readable and given with what they set."""
    if args.amp_dtype != "auto" and not args.amp:
        raise UserError(f"--amp-dtype {args.amp_dtype} sets the precision of --amp: add --amp")
    if args.amp and args.amp_backend == "apex" and args.amp_dtype == "bfloat16":
        raise UserError("--amp-backend apex casts to float16 only: use --amp-backend native for bfloat16")
    if args.loss_scale != "dynamic":
        try:
            if float(args.loss_scale) <= 0:
                raise ValueError
        except ValueError:
            raise UserError(f"--loss-scale must be 'dynamic' or a positive number, got {args.loss_scale!r}") from None
        if "init_loss_scale" in args.explicit_options:
            raise UserError(f"--init-loss-scale starts a dynamic --loss-scale; --loss-scale {args.loss_scale} is "
                            "fixed: give one or the other")
    if not 0 < args.init_loss_scale < float("inf"):
        raise UserError(f"--init-loss-scale must be a positive number, got {args.init_loss_scale:g}")


def is_named(pretrained):
    """--pretrained torchvision / timm: a library's published weights rather than a file."""
    return pretrained in named_weights.SOURCES


def check_weights(args):
    """--resume and --pretrained exist, the named weights are published for --arch, --crop-pct is a fraction."""
    if args.evaluate and not (args.resume or args.pretrained):
        raise UserError("--evaluate needs weights: give --resume PATH or --pretrained PATH|torchvision|timm")
    if is_named(args.pretrained):
        named_weights.resolve(args.pretrained, args.arch)
    for flag in ("resume", "pretrained"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path) and not (flag == "pretrained" and is_named(path)) and \
                not (flag == "resume" and path == checkpoint.AUTO):
            raise UserError(f"--{flag}: checkpoint not found: {path}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UserError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")


def check_combinations(args):
    """Options that only work together, whatever the device."""
    if (args.auto_augment or args.random_erase) and args.pipeline != "standard":
        raise UserError("--auto-augment and --random-erase work on PIL images: add --pipeline standard")


def check_devices(args):
    """What the device kind can run."""
    if args.sync_bn and args.device_kind == "cpu":
        raise UserError("--sync-bn needs NPUs or CUDA GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
    if args.compile and args.device_kind == "npu":
        raise UserError("--compile is refused on NPU: torch_npu registers its own torch.compile backends (npu, "
                        "npugraph_ex, npugraphs), but this project has not been tested with them on an NPU; leave "
                        "--compile off on NPU")
    if args.pipeline == "gpu" and args.device_kind == "npu":
        raise UserError("--pipeline gpu decodes with nvJPEG on a CUDA device; on NPU use --pipeline fast")
    if args.amp and args.amp_backend == "apex" and args.device_kind == "cpu":
        raise UserError("--amp-backend apex needs an NPU or a CUDA GPU; on the CPU use --amp-backend native")


def device_ids(args):
    """--device-list, checked; by default device 0, or every device for one process per device."""
    default_ids = "0"
    if (args.multiprocessing_distributed or distributed.launcher_ranks() is not None) and args.device_kind != "cpu":
        default_ids = ",".join(str(i) for i in range(devices.device_count(args.device_kind)))
    return devices.parse_device_list(args.device_list or default_ids, args.device_kind)


def data_folder(args):
    """The image folder: None with --dummy, the digits demo's (written now) without DIR, else DIR, checked."""
    if args.dummy:
        return None
    if args.data is None:
        check_output_dir(args)  # the demo's folder is written inside it
        return demo.prepare_demo_folder(os.path.join(args.output_dir, "digits-imagefolder"))
    data.check_layout(args.data, need_train=not args.evaluate)
    return args.data


def run_output_dir(args):
    """--output-dir; for the demo run with its default folder, a new folder when that one holds an earlier run's
    checkpoint (demo.output_dir): run again, the demo trains again rather than stop at the refusal to replace it."""
    demo_run = args.data is None and not args.dummy
    if not demo_run or "output_dir" in args.explicit_options or args.resume or args.evaluate or args.no_checkpoint:
        return args.output_dir
    return demo.output_dir(args.output_dir)


def check_output_dir(args):
    """--output-dir exists (created now) and is writable."""
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --output-dir {args.output_dir}: {exc.strerror or exc}") from None
    if not os.access(args.output_dir, os.W_OK):
        raise UserError(f"--output-dir {args.output_dir} is not writable")


def choose_val_preprocessing(args, weights):
    """Set --val-crop-size, --val-resize-size and --interpolation as validation uses them: a flag given on the
    command line wins, then the named weights' own preprocessing, then the defaults. A crop pct (--crop-pct, else
    the weights') makes the resize floor(crop / crop pct), timm's rule, unless --val-resize-size is given.
    Returns what was chosen and why, for the log."""
    given = set(args.explicit_options)
    published = weights.preprocessing if weights is not None else None
    origin = {name: "flag" if name in given else "default"
              for name in ("val_crop_size", "val_resize_size", "interpolation")}
    if published is not None:
        for name, value in (("val_crop_size", published.crop_size), ("interpolation", published.interpolation)):
            if name not in given:
                setattr(args, name, value)
                origin[name] = "weights"
    crop_pct = args.crop_pct if args.crop_pct is not None else published and published.crop_pct
    if crop_pct:
        resize = named_weights.resize_for(args.val_crop_size, crop_pct)
        if "val_resize_size" not in given:
            args.val_resize_size = resize
            origin["val_resize_size"] = (f"crop / {float(crop_pct):.4g}, "
                                         + ("--crop-pct" if args.crop_pct is not None else "weights"))
        elif args.crop_pct is not None and resize != args.val_resize_size:
            raise UserError(f"--crop-pct {args.crop_pct} with --val-crop-size {args.val_crop_size} means "
                            f"--val-resize-size {resize}, but --val-resize-size is {args.val_resize_size}; "
                            "give one of them")
    chosen = (f"validation: resize {args.val_resize_size} ({origin['val_resize_size']}), centre crop "
              f"{args.val_crop_size} ({origin['val_crop_size']}), {args.interpolation} ({origin['interpolation']})")
    return chosen + (f"; weights: {weights.description}" if weights is not None else "")
