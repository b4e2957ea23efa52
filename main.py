"""Train and evaluate MnasNet on ImageNet, on Ascend NPUs, NVIDIA GPUs or the CPU, on one or many devices.

    python main.py /data/imagenet -a mnasnet1_0 --device npu --amp             # 1 device
    python main.py /data/imagenet --multiprocessing-distributed --device-list 0,1,2,3,4,5,6,7 --amp
    torchrun --nproc_per_node 8 main.py /data/imagenet --amp                   # also multi-node
    srun python main.py /data/imagenet --amp                                   # SLURM: one task per device
    python main.py                                                             # demo: digits, a few minutes on a CPU

Read top to bottom: main() parses and launches one process per device, train() is one process's run, and the
functions after it come in the order train() calls them; ``Run`` holds what a run builds, and saves and stops it.
The options, their checks and the prepare step are in training/options.py.
"""
from training import autoload_off  # noqa: F401  # isort: skip  (before torch: see training/autoload_off.py)

import argparse
import dataclasses
import logging
import os
import sys
import time
import traceback

import torch
import torch.nn as nn

import mnasnet
from training import (checkpoint, data, distributed, engine, meters, metrics, named_weights, pipeline, prefetch,
                      profiling, recipe, transforms)
from training.options import check_args, parse_args, prepare
from training.precision import Precision, build_precision
from training.summary import RunSummary
from training.utils import UserError, epoch_seed, exit_on_user_error, seed_everything, setup_logging, state_digest

DUMMY_CLASSES = 1000


def main(argv=None):
    """Parse and check the command line, prepare the machine, then run main_worker in each process."""
    args = parse_args(argv)
    with exit_on_user_error():
        check_args(args)
        prepare(args)
        distributed.launch(main_worker, args)


def main_worker(local_rank, args):
    """One process: train, turning a bad input or a failed collective into a one-line error; among several ranks, the
    rank that meets an unexpected error prints its traceback (rank k > 0: into rank<k>.log)."""
    try:
        with exit_on_user_error(), engine.StopRequest() as stop:
            train(local_rank, args, stop)
    except Exception as exc:
        message = distributed.collective_failure(exc, args.dist_timeout) if isinstance(exc, RuntimeError) else None
        if message is not None:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)
        if not torch.distributed.is_initialized():
            raise
        # Said here, before the cleanup below lets the other ranks see this one gone: the first of them to exit can
        # make the launcher end this process, and the traceback with it.
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)
    finally:
        # Before the process exits: after an uncaught error, a loader's workers would otherwise keep it alive.
        data.close_loaders()
        distributed.cleanup()


def train(local_rank, args, stop):
    """One process's run: set up, build, resume, then train and validate epoch by epoch, and report."""
    run_start = time.perf_counter()
    runtime, log = set_up_process(args, local_rank)
    resume_path = agreed_resume_path(args, runtime, log)
    train_set, val_set = build_datasets(args, resume_path, data.FileLists(args.output_dir, runtime, log))
    log_run_shape(train_set, val_set, runtime, args, log)
    run = build_run(args, runtime, log, stop, val_set.classes, resume_path)
    run.prepare_output_dir()
    train_loader, val_loader, train_sampler = build_loaders(train_set, val_set, runtime, args, log)
    run.schedule(train_loader)
    start = start_point(run, resume_path)
    run.summary = RunSummary(args, runtime, run_start)
    if args.evaluate:
        evaluate_only(run, val_loader)
        return
    train_epochs(run, train_loader, val_loader, train_sampler, start)
    run.finish()


def set_up_process(args, local_rank):
    """This process's device, process group, logging, threads and seed: (runtime, log)."""
    runtime = distributed.setup_runtime(args, local_rank)
    log = setup_logging(args.output_dir, args.log_file, runtime.rank)
    if runtime.kind == "cpu" and runtime.distributed and "OMP_NUM_THREADS" not in os.environ:
        # Processes sharing one machine's cores: one share each, or their OpenMP threads fight.
        torch.set_num_threads(cpus_per_process(runtime))
    if args.seed is not None:
        seed_everything(args.seed)
    if args.batch_size % runtime.world_size:
        raise UserError(f"-b/--batch-size {args.batch_size} is the global batch and must divide evenly "
                        f"across {runtime.world_size} processes")
    return runtime, log


def usable_cpus():
    """The CPUs this process may run on (its affinity mask: taskset, cgroups, a scheduler's binding)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpus_per_process(runtime):
    """This process's share: its CPUs split between the processes on this node (not the whole job's); srun's
    --cpus-per-task when given, which is already one task's share."""
    if distributed.launched_by_slurm() and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, min(int(os.environ["SLURM_CPUS_PER_TASK"]), usable_cpus()))
    return max(1, usable_cpus() // runtime.local_world_size)


def agreed_resume_path(args, runtime, log):
    """The checkpoint this run continues ('' for a new run), as rank 0 finds it before any file is written
    (checkpoint.resume_path: --resume auto, or the refusal to replace another run's checkpoint); every rank takes
    rank 0's answer, or stops with its error."""
    answer = None
    if runtime.is_main:
        try:
            answer = checkpoint.resume_path(args, data_classes(args)), None
        except UserError as exc:
            answer = None, str(exc)
    path, error = runtime.broadcast_object(answer)
    if error:
        raise UserError(error)
    if args.resume == checkpoint.AUTO and not path:
        log.info(f"=> --resume auto: no checkpoint in {args.output_dir}, a new run starts")
    return path


def data_classes(args):
    """The class folder names of the data a training run would read (None for synthetic data); -e reads its
    checkpoint's."""
    if args.data_dir is None or args.evaluate:
        return None
    (_, classes), _ = data.check_layout(args.data_dir)
    return classes


def build_datasets(args, resume_path, file_lists=data.list_images):
    """(train set, val set); with -e the train set is None (evaluation reads val/ alone). ``file_lists`` lists a
    folder's images (data.FileLists: once per job, cached for the next run)."""
    if args.data_dir is None:
        val_images = max(args.dummy_images // 25, 1)
        val_set = data.SyntheticImages(val_images, DUMMY_CLASSES, args.val_crop_size, seed=1)
        if args.evaluate:
            return None, val_set
        return data.SyntheticImages(args.dummy_images, DUMMY_CLASSES, args.train_crop_size, seed=0), val_set
    (train_tf, train_read), (val_tf, val_read) = pipeline.build(args.pipeline, args, args.fast_val)
    if args.evaluate:
        return None, data.val_image_folder(args.data_dir, val_tf, evaluated_classes(args, resume_path), val_read,
                                           file_lists)
    return data.image_folders(args.data_dir, train_tf, val_tf, seed=args.seed, loaders=(train_read, val_read),
                              file_lists=file_lists)


def evaluated_classes(args, resume_path):
    """The class folder names the evaluated checkpoint records (main.py's do), or None."""
    if not resume_path and args.named_weights is not None:
        return None  # published weights: ImageNet's classes in sorted folder order
    state = checkpoint.load_file(resume_path or args.pretrained)
    classes = state.get("classes") if isinstance(state, dict) else None
    return classes if isinstance(classes, (list, tuple)) else None


def log_run_shape(train_set, val_set, runtime, args, log):
    """The run's first lines: what trains on what, and how validation preprocesses."""
    train_images = f"{len(train_set)} train / " if train_set is not None else ""
    log.info(f"=> {args.arch}, {len(val_set.classes)} classes, {train_images}{len(val_set)} val images, "
             f"{runtime.world_size} x {runtime.kind}, global batch {args.batch_size}")
    log.info(f"=> {args.val_preprocessing}")


def build_run(args, runtime, log, stop, classes, resume_path):
    """The model (with its starting weights), loss, optimizer, precision, EMA and the wrappers the loops call.
    ``classes`` label both sets (with -e there is no train set)."""
    num_classes = len(classes)
    model = build_model(args, runtime, num_classes, log, resume_path)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing).to(runtime.device)
    params = recipe.parameter_groups(model, args.weight_decay, args.decay_norm_and_bias)
    optimizer = recipe.build_optimizer(runtime.kind, params, args)
    model, optimizer, precision = build_precision(runtime.kind, model, optimizer, args)
    log.info(f"=> precision: {precision.name}, memory format: {str(runtime.memory_format).replace('torch.', '')}")
    log.info(f"=> kernel settings: {runtime.kernel_settings}")
    model_without_ddp = model
    ema = recipe.model_ema(model, args.model_ema_decay, args.model_ema_steps) if args.model_ema else None
    if runtime.distributed:
        model = runtime.data_parallel(model)
    if args.compile:
        # Only the loops call the compiled wrapper; checkpoints keep model_without_ddp's plain keys.
        model = torch.compile(model, backend=args.compile)
    # Class folder names travel in the checkpoint, so classify.py can name its predictions.
    class_names = list(classes) if args.data_dir is not None else None
    return Run(args=args, runtime=runtime, log=log, stop=stop, model=model,
               model_without_ddp=model_without_ddp, ema=ema, criterion=criterion, optimizer=optimizer,
               precision=precision, mix=transforms.batch_mix(num_classes, args.mixup, args.cutmix),
               num_classes=num_classes, class_names=class_names,
               throughput=meters.ThroughputMeter(args.fps_warmup_steps))


def build_model(args, runtime, num_classes, log, resume_path):
    """The network with its --named-weights or --pretrained weights, on the device in its memory format."""
    model = mnasnet.ARCHS[args.arch](num_classes=num_classes, dropout=args.dropout)
    mnasnet.set_bn_momentum(model, args.bn_momentum)
    if args.named_weights is not None:
        state = named_weights.fetch(args.named_weights, progress=False)
        checkpoint.load_model_weights(model, state, args.arch, args.named_weights.description)
        log.info(f"=> loaded {args.named_weights.description} weights")
    elif args.pretrained:
        checkpoint.load_model_weights(model, checkpoint.load_file(args.pretrained), args.arch, args.pretrained)
        log.info(f"=> loaded weights from {args.pretrained}")
    if resume_path and isinstance(model, mnasnet.MNASNet):
        # resume() loads the weights after the optimizer, apex and DDP took the parameters: a stem that loading
        # would rebuild (torchvision's version-1 layout) is built now.
        model.use_layout(checkpoint.layout_version(checkpoint.load_file(resume_path)))
    if args.sync_bn and runtime.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(runtime.device, memory_format=runtime.memory_format)
    return model


def build_loaders(train_set, val_set, runtime, args, log):
    per_process_batch = args.batch_size // runtime.world_size
    workers = loader_workers(args, runtime)
    val_sampler = data.EvalShardSampler(val_set, runtime.world_size, runtime.rank) if runtime.distributed else None
    device_decode = args.pipeline == "gpu" and args.data_dir is not None
    val_decode = device_decode and args.fast_val
    val_loader = data.build_loader(val_set, per_process_batch, workers, sampler=val_sampler,
                                   pin_memory=runtime.pin_memory, persistent=False,
                                   collate_fn=pipeline.collate_bytes if val_decode else None)
    val_transfer = None
    if val_decode:
        val_transfer = prefetch.DeviceDecode(runtime, False, args.val_crop_size, resize_size=args.val_resize_size,
                                             strict=args.strict_data, log=log, interpolation=args.interpolation)
    # Unreadable files are reported as batches leave the workers; the device stage comes last.
    val_loader = prefetch.DeviceLoader(data.CheckedLoader(val_loader, args.strict_data, log), runtime, val_transfer)
    if train_set is None:
        return None, val_loader, None  # -e

    # The shuffle order is a function of (seed, epoch) on one process as on many, so a resumed run sees
    # the same order as an uninterrupted one.
    train_sampler = data.TrainSampler(train_set, runtime.world_size, runtime.rank, seed=args.seed or 0)
    train_loader = data.build_loader(train_set, per_process_batch, workers, sampler=train_sampler, drop_last=True,
                                     pin_memory=runtime.pin_memory, seed=args.seed,
                                     collate_fn=pipeline.collate_bytes if device_decode else None)
    if len(train_loader) == 0:
        raise UserError(f"{len(train_set)} training images make no full batch of {per_process_batch} per process; "
                        "lower -b/--batch-size")
    train_transfer = None
    if device_decode:
        train_transfer = prefetch.DeviceDecode(runtime, True, args.train_crop_size, (args.min_crop_scale, 1.0),
                                               strict=args.strict_data, log=log)
    return (prefetch.DeviceLoader(data.CheckedLoader(train_loader, args.strict_data, log), runtime, train_transfer),
            val_loader, train_sampler)


def loader_workers(args, runtime):
    return args.workers if args.workers is not None else default_workers(runtime)


def default_workers(runtime):
    """Leave a core per process for the training loop itself. One fast-pipeline worker makes roughly 250-400
    ImageNet crops/s (bench.py), so up to 16 per process feed an NPU at the reference's 2,570 img/s with room."""
    return max(1, min(16, cpus_per_process(runtime) - 1))


@dataclasses.dataclass
class StartPoint:
    """Where training starts (``epoch``, ``step``) and, for a resumed run, what its checkpoint had reached: the
    random state to restore mid-epoch, the best Acc@1, the figures of an epoch trained but not yet validated."""
    epoch: int = 0
    step: int = 0
    rng: list = None
    best_acc1: float = 0.0
    trained_epoch: dict = None


def start_point(run, resume_path):
    """The checkpoint's (``resume_path``) or --start-epoch; a resumed run also takes the checkpoint's best Acc@1."""
    args = run.args
    start = StartPoint(epoch=args.start_epoch or 0)
    if resume_path:
        start = resume(args, resume_path, run.model_without_ddp, run.optimizer, run.scheduler, run.precision,
                       run.ema, run.runtime, run.log)
        run.best_acc1, run.trained_epoch = start.best_acc1, start.trained_epoch
    start.epoch, start.step = first_unfinished_step(start.epoch, start.step, run.steps_per_epoch, run.trained_epoch)
    if resume_path and not args.evaluate and start.epoch >= args.epochs:
        raise UserError(f"--resume {resume_path} has finished its {start.epoch} epochs, all of --epochs "
                        f"{args.epochs}: give a larger --epochs to train on, or -e to evaluate it")
    return start


def resume(args, path, model, optimizer, scheduler, precision, ema, runtime, log):
    """Load the checkpoint at ``path``: the weights always; with training ahead, also everything needed to go on
    where the run stopped, at the checkpoint's epoch (not --start-epoch) and, when given, the new --lr. Returns its
    StartPoint (-e: the default one)."""
    state = checkpoint.load_file(path)
    missing = [] if args.evaluate else checkpoint.missing_run_state(state)
    if missing:
        raise UserError(f"--resume {path} is not a checkpoint of a training run (it has no "
                        f"{', '.join(missing)}); to start training from its weights, use --pretrained {path}")
    checkpoint.load_model_weights(model, state, args.arch, path)
    start = StartPoint()
    if not args.evaluate:
        kernels = [{key: group[key] for key in ("fused", "foreach") if key in group}
                   for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, chosen in zip(optimizer.param_groups, kernels):
            group.update(chosen)  # which kernels run is this device's choice, not the saved run's (fused: CUDA)
        scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state.get("precision", {}))
        if ema is not None and "model_ema" in state:
            ema.load_state_dict(state["model_ema"])
        start = StartPoint(state["epoch"], state.get("step", 0), resumed_rng_state(state, runtime, log),
                           state["best_acc1"], state.get("trained_epoch"))
        if args.start_epoch is not None and args.start_epoch != state["epoch"]:
            log.warning(f"=> --start-epoch {args.start_epoch} ignored: the resumed run goes on at the "
                        f"checkpoint's epoch {state['epoch']}")
        saved_lr = scheduler.base_lrs[0]
        new_lr = args.lr if "lr" in args.explicit_options and args.lr != saved_lr else None
        factor = recipe.resume_schedule(optimizer, scheduler, new_lr)
        if new_lr is not None:
            log.info(f"=> --lr {new_lr} replaces the checkpoint's {saved_lr}: the learning rate schedule is "
                     f"scaled by {factor:.4g} from here on")
    log.info(f"=> resumed {path} (epoch {state.get('epoch')}, step {state.get('step', 0)}, "
             f"best Acc@1 {state.get('best_acc1')})")
    return start


def first_unfinished_step(epoch, step, steps_per_epoch, trained_epoch):
    """Where training goes on from a resumed (epoch, step). A run stopped after the last step of an epoch (or
    during its validation) saved that epoch's training figures: it resumes with that epoch's validation and record
    (train_epochs). A checkpoint without them goes on with the next epoch, rather than an empty one."""
    return (epoch + 1, 0) if step >= steps_per_epoch and trained_epoch is None else (epoch, step)


def resumed_rng_state(state, runtime, log):
    """This rank's RNG state from a checkpoint, for a mid-epoch resume; None (with a warning) if the checkpoint
    was written by another number of processes."""
    saved = state.get("rng")
    if saved is None or len(saved) != runtime.world_size:
        if state.get("step"):
            log.warning("=> resuming mid-epoch with another number of processes than the checkpoint's: the rest of "
                        "this epoch draws other random numbers than the interrupted run would have")
        return None
    return saved[runtime.rank]


def evaluate_only(run, val_loader):
    """-e: score the weights once, write the summary."""
    args, stop = run.args, run.stop
    # Compiled for -e only: a frozen compile is made for one set of weights, and torch 2.14 keeps each one's
    # weights (about 50 MB for mnasnet1_0) after it is gone, so compiling every epoch's validation would leak.
    scored = engine.inference_model(run.model_without_ddp, args.fuse_bn, args.compile)
    result = engine.evaluate(scored, run.criterion, run.precision, val_loader, run.runtime, run.log, stop,
                             args.print_freq)
    if result is None:
        run.log.info(f"=> stopped by {stop.name} during validation")
        raise SystemExit(128 + stop.signum)
    run.summary.add_validation(result)
    run.summary.update(best_acc1=result["acc1"])
    run.summary.write(run.log)


def train_epochs(run, train_loader, val_loader, train_sampler, start):
    """The epoch loop from ``start``: train, validate, record, checkpoint. Returns after the last epoch; a stop
    exits."""
    args, runtime = run.args, run.runtime
    profiler = start_profiler(args, runtime, run.steps_per_epoch - start.step) if args.profile else None
    run.metrics_log = metrics.MetricsLog(args.output_dir, start.epoch, args.tensorboard) if runtime.is_main else None
    run.save_clock = engine.SaveClock(0 if args.no_checkpoint else args.save_every_minutes)
    for epoch in range(start.epoch, args.epochs):
        first_step = start.step if epoch == start.epoch else 0
        start_epoch_streams(run, train_sampler, epoch, first_step, start.rng)
        epoch_start, epoch_lr = time.perf_counter(), run.optimizer.param_groups[0]["lr"]
        if first_step >= run.steps_per_epoch:
            # The interrupted run trained this epoch to its end: it is validated and recorded with the saved figures.
            train_stats = {**run.trained_epoch, "breakdown": meters.StepBreakdown()}
            epoch_lr, train_seconds = run.trained_epoch["lr"], run.trained_epoch["seconds"]
        else:
            train_stats = engine.train_one_epoch(
                run.model, run.criterion, run.optimizer, run.scheduler, run.precision, train_loader, runtime, epoch,
                run.log, run.throughput, run.stop, batch_size=args.batch_size, print_freq=args.print_freq,
                max_steps=args.max_steps, max_nonfinite_steps=args.max_nonfinite_steps, start_step=first_step,
                ema=run.ema, ema_steps=args.model_ema_steps, mix=run.mix, profiler=profiler,
                save_clock=run.save_clock, save=lambda steps_done: run.save_mid_epoch(epoch, steps_done))
            train_seconds = time.perf_counter() - epoch_start
            if profiler is not None:
                profiler.finish(run.log, runtime.is_main)  # the window is in the first epoch: validation stays out
                profiler = None
            run.record_training(epoch, first_step, train_stats, train_seconds, epoch_lr)
            if train_stats["stopped"]:
                run.stop_run(train_stats["stopped"], epoch, train_stats["steps_done"])
        val_stats, ema_stats = validate_epoch(run, val_loader, epoch, run.steps_per_epoch)
        run.record_epoch(epoch, train_stats, val_stats, ema_stats, epoch_lr, epoch_start, train_seconds)
        is_best, best_is_ema = run.update_best(val_stats.get("acc1"), ema_stats)
        if run.stop.requested(runtime):
            run.stop_run(run.stop.name, epoch + 1, 0, is_best, best_is_ema)
        run.save(epoch + 1, 0, is_best, best_is_ema)
        runtime.barrier()


def start_profiler(args, runtime, first_epoch_steps):
    """--profile's profiler, recording from the next training step; its window must fit in the first epoch."""
    wait, warmup, active = args.profile_window
    if wait + warmup + active > first_epoch_steps:
        raise UserError(f"--profile-steps {args.profile_steps} needs {wait + warmup + active} training steps, but "
                        f"the first epoch has {first_epoch_steps}: lower WAIT, WARMUP or ACTIVE")
    return profiling.WindowProfiler(runtime.kind, args.output_dir, runtime.rank, wait, warmup, active)


def start_epoch_streams(run, train_sampler, epoch, first_step, resumed_rng):
    """Position the sampler and the random streams for ``epoch``, from ``first_step``."""
    args, runtime = run.args, run.runtime
    train_sampler.set_epoch(epoch, first_step * (args.batch_size // runtime.world_size))
    if args.seed is not None:
        seed_everything(epoch_seed(args.seed, epoch, runtime.rank))
    if first_step and resumed_rng is not None:
        # Mid-epoch: the random streams (dropout) go on from where the interrupted run left them.
        checkpoint.restore_rng_state(resumed_rng, runtime.kind)


def validate_epoch(run, val_loader, epoch, steps_done):
    """Every rank takes rank 0's BatchNorm statistics, validation or not: all ranks then score, and end with, the
    weights that rank 0 saves. Then, unless --no-val, score them: (weights' stats, EMA's stats), {} where none."""
    run.runtime.broadcast_buffers(run.model_without_ddp)
    if run.ema is not None:
        run.runtime.broadcast_buffers(run.ema)
    if run.args.no_val:
        return {}, {}
    scored = validate(run.model_without_ddp, run.ema, run.criterion, run.precision, val_loader, run.runtime,
                      run.args, run.log, run.stop)
    if scored is None:
        run.stop_run(run.stop.name, epoch, steps_done)
    val_stats, ema_stats = scored
    run.summary.add_validation(val_stats, ema_stats)
    return val_stats, ema_stats


def validate(model_without_ddp, ema, criterion, precision, val_loader, runtime, args, log, stop):
    """Score the weights and, with --model-ema, their EMA: (weights' stats, EMA's stats or {}), or None when the
    run was asked to stop."""
    scored = engine.inference_model(model_without_ddp, args.fuse_bn)
    val_stats = engine.evaluate(scored, criterion, precision, val_loader, runtime, log, stop, args.print_freq)
    if val_stats is None or ema is None:
        return None if val_stats is None else (val_stats, {})
    scored = engine.inference_model(ema, args.fuse_bn)
    ema_stats = engine.evaluate(scored, criterion, precision, val_loader, runtime, log, stop, args.print_freq,
                                name="EMA")
    return None if ema_stats is None else (val_stats, ema_stats)


def breakdown_line(epoch, breakdown):
    if not breakdown.steps:
        return f"=> epoch {epoch}: no step time split (all its steps were --fps-warmup-steps)"
    means = breakdown.means_ms()
    return (f"=> epoch {epoch} mean step {sum(means.values()):.1f} ms: data wait {means['data_ms']:.1f}, "
            f"host-to-device {means['copy_ms']:.1f}, compute {means['compute_ms']:.1f} "
            f"(data wait {100 * breakdown.data_share:.0f}%)")


@dataclasses.dataclass
class Run:
    """What one process's run holds, from its build to its report. ``model`` is what the loops call (the DDP
    and/or compiled wrapper); checkpoints hold ``model_without_ddp``. ``scheduler`` and ``steps_per_epoch`` come
    with the training loader (``schedule``), ``summary`` once the start point is known."""
    args: argparse.Namespace
    runtime: distributed.Runtime
    log: logging.Logger
    stop: engine.StopRequest
    model: nn.Module
    model_without_ddp: nn.Module
    ema: object  # torch.optim.swa_utils.AveragedModel with --model-ema, else None
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    mix: object  # transforms.batch_mix: MixUp/CutMix, or None
    num_classes: int
    class_names: list  # the class folders' names; None for the built-in data sets
    throughput: meters.ThroughputMeter
    scheduler: object = None
    steps_per_epoch: int = 1
    summary: RunSummary = None
    best_acc1: float = 0.0
    metrics_log: metrics.MetricsLog = None
    breakdown: meters.StepBreakdown = dataclasses.field(default_factory=meters.StepBreakdown)
    slow_loader_said: bool = False
    # The figures of an epoch trained to its last step and not yet validated: saved with a stop there, so that the
    # resumed run validates and records that epoch.
    trained_epoch: dict = None
    save_clock: engine.SaveClock = None  # --save-every-minutes, from the first training step

    def prepare_output_dir(self):
        """Rank 0 of a run that checkpoints: clear killed writes' leftovers, check there is room for checkpoints."""
        if self.runtime.is_main and not (self.args.no_checkpoint or self.args.evaluate):
            for path in checkpoint.remove_interrupted_writes(self.args.output_dir):
                self.log.info(f"=> removed {path}, left by a checkpoint write that was killed")
            checkpoint.check_free_space(self.args.output_dir, self.model_without_ddp)

    def schedule(self, train_loader):
        """The learning rate schedule, stepped once per training step (-e has no training loader: its schedule is
        built, never stepped). A fresh run from --start-epoch N takes the learning rate an uninterrupted run has
        at epoch N."""
        args = self.args
        steps_per_epoch = len(train_loader) if train_loader is not None else 1
        self.steps_per_epoch = min(steps_per_epoch, args.max_steps) if args.max_steps else steps_per_epoch
        self.scheduler = recipe.lr_schedule(self.optimizer, self.steps_per_epoch, args.warmup, args.epochs,
                                            args.lr_scheduler, args.lr_decay_epochs, args.lr_decay_rate,
                                            first_step=(args.start_epoch or 0) * self.steps_per_epoch)

    def save(self, epoch, step, is_best, best_is_ema=False, why=""):
        """Every rank calls this (their RNG states are gathered); rank 0 writes, then tells every rank the path
        (None with --no-checkpoint), which each logs (``why``: a note for the line) and returns."""
        rng = self.runtime.all_gather_object(checkpoint.rng_state(self.runtime.kind))
        path = self.write_checkpoint(epoch, step, is_best, best_is_ema, rng) if self.runtime.is_main else None
        path = self.runtime.broadcast_object(path)
        if self.save_clock is not None:
            self.save_clock.restart()
        if path:
            writer = "" if self.runtime.is_main else "rank 0 "
            self.log.info(f"=> {writer}saved {path}" + (" (best)" if is_best else "") + why)
        return path

    def save_mid_epoch(self, epoch, steps_done):
        """--save-every-minutes' save, at ``steps_done`` steps of ``epoch``; resumed like a stop's."""
        self.save(epoch, steps_done, False, why=f" at epoch {epoch}, step {steps_done}/{self.steps_per_epoch} "
                                               f"(--save-every-minutes {self.args.save_every_minutes:g})")

    def write_checkpoint(self, epoch, step, is_best, best_is_ema, rng):
        """Rank 0: the checkpoint (and the best model), unless --no-checkpoint. The path, or None."""
        args = self.args
        if args.no_checkpoint:
            return None
        state = {"epoch": epoch, "step": step, "arch": args.arch, "state_dict": self.model_without_ddp.state_dict(),
                 "best_acc1": self.best_acc1, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "precision": self.precision.state_dict(), "rng": rng,
                 "num_classes": self.num_classes, "classes": self.class_names, "args": checkpoint.plain_args(args)}
        if step >= self.steps_per_epoch:
            state["trained_epoch"] = self.trained_epoch
        best = None
        if self.ema is not None:
            state["model_ema"] = self.ema.state_dict()
            if best_is_ema:
                best = {**state, "state_dict": self.ema.module.state_dict(), "weights": "ema"}
        return checkpoint.save_checkpoint(state, is_best, args.output_dir, best=best)

    def stop_run(self, reason, epoch, step, is_best=False, best_is_ema=False):
        """Save where the run stands (the weights of the last applied step), report, exit non-zero."""
        path = self.save(epoch, step, is_best, best_is_ema)
        self.summary.update(stopped=reason, best_acc1=self.best_acc1)
        self.summary.write(self.log, self.throughput)
        self.stop.end_run(reason, f"epoch {epoch}, step {step}/{self.steps_per_epoch}", path,
                          engine.nonfinite_limit(self.args.max_nonfinite_steps, self.precision), self.log)

    def record_training(self, epoch, first_step, stats, seconds, lr):
        """Log the epoch's step breakdown (and, once, a slow loader) and add its training figures to the summary;
        keep them for a checkpoint written before the epoch is validated."""
        args, log = self.args, self.log
        self.trained_epoch = {key: stats[key] for key in ("loss", "acc1", "count", "skipped_images", "skipped_steps")}
        self.trained_epoch.update(seconds=seconds, lr=lr)
        epoch_breakdown = stats["breakdown"]
        self.breakdown.merge(epoch_breakdown)
        log.info(breakdown_line(epoch, epoch_breakdown))
        slow_loader = epoch_breakdown.slow_loader_message(loader_workers(args, self.runtime), args.pipeline)
        if slow_loader and not self.slow_loader_said:
            log.warning(slow_loader)
            self.slow_loader_said = True
        self.summary.add_training(stats, first_step, self.breakdown)
        if stats["skipped_images"] or stats["skipped_steps"]:
            log.info(f"=> epoch {epoch}: {stats['skipped_images']} unreadable images replaced, "
                     f"{stats['skipped_steps']} steps skipped (non-finite gradients)")

    def record_epoch(self, epoch, train_stats, val_stats, ema_stats, epoch_lr, epoch_start, train_seconds):
        """The epoch's row in the summary's history and, on rank 0, in the metrics log."""
        means_ms = train_stats["breakdown"].means_ms()
        acc1 = val_stats.get("acc1")
        self.summary.add_epoch(epoch, train_stats, acc1)
        if self.metrics_log is not None:
            # Written before the checkpoint: a crash in between is redone on resume, which rewrites this row.
            self.metrics_log.write(epoch=epoch, train_loss=train_stats["loss"], train_acc1=train_stats["acc1"],
                                   val_loss=val_stats.get("loss"), val_acc1=acc1, val_acc5=val_stats.get("acc5"),
                                   lr=epoch_lr, images_per_s=train_stats["count"] / train_seconds,
                                   epoch_seconds=time.perf_counter() - epoch_start,
                                   ema_val_loss=ema_stats.get("loss"), ema_val_acc1=ema_stats.get("acc1"),
                                   ema_val_acc5=ema_stats.get("acc5"), **means_ms)

    def update_best(self, acc1, ema_stats):
        """Take the epoch's Acc@1 (None without validation) into the best: (is it the best, are the best weights
        the EMA's). The best checkpoint holds whichever of the weights and their EMA scored higher."""
        ema_better = bool(ema_stats) and ema_stats["acc1"] > acc1
        score = ema_stats["acc1"] if ema_better else acc1
        is_best = score is not None and score > self.best_acc1
        self.best_acc1 = max(self.best_acc1, score) if score is not None else self.best_acc1
        return is_best, ema_better

    def finish(self):
        """After the last epoch: close the metrics log and plot it, log the weights' digest, write the summary."""
        if self.metrics_log is not None:
            self.metrics_log.close()
            metrics.plot_curves(self.metrics_log.path, metrics.default_png(self.metrics_log.path))
        # Every rank logs it (ranks > 0 in rank<k>.log): equal digests prove all nodes ended with the same weights.
        digest = state_digest(self.model_without_ddp.state_dict())
        self.log.info(f"=> rank {self.runtime.rank} weights sha256 {digest}")
        self.summary.update(weights_sha256=digest, best_acc1=self.best_acc1)
        self.summary.write(self.log, self.throughput)


if __name__ == "__main__":
    main()
