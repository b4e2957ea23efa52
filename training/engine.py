"""One training epoch and one validation pass. Device-agnostic: everything device-specific is in ``runtime``
and ``precision`` (distributed.py, precision.py)."""
import copy
import signal
import sys
import time

import torch
import torch.nn as nn
from torch.fx.experimental.optimization import fuse
from tqdm import tqdm

from training import meters
from training.meters import MetricSums, SkippedSteps
from training.utils import STOP_SIGNALS, UserError, interactive


class StopRequest:
    """SIGINT and SIGTERM (Ctrl-C, a pre-empted job) ask the run to stop after the current step.

    The handler only records the signal; the training loop asks ``requested()`` after each step. With several
    processes the ranks agree (an all-reduce) at each printed line, so they all stop after the same step.
    Used as a context manager, it restores the previous handlers on exit.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None

    def requested(self, runtime, sync_point=True):
        return self.agree(runtime, sync_point)[0]

    def agree(self, runtime, sync_point=True, save_due=False):
        """(stop, save): whether the run stops after this step, and whether it saves mid-epoch now (``save_due``:
        this rank's SaveClock says so). With several processes the ranks agree at sync points, each flag set where
        any rank's is, in one all-reduce (the one the stop check makes anyway); between them both are False."""
        if not runtime.distributed:
            return self.signum is not None, save_due
        if not sync_point:
            return False, False
        flags = torch.tensor([0.0 if self.signum is None else 1.0, float(save_due)], device=runtime.device)
        stop, save = (runtime.all_reduce_sum(flags) > 0).tolist()
        if stop:
            # Another rank was signalled: this one stops with it.
            self.signum = self.signum or signal.SIGTERM
        return stop, save

    def end_run(self, reason, where, path, nonfinite_in_a_row, log):
        """Exit once the run has saved where it stands in ``path`` (rank 0's checkpoint; None with --no-checkpoint).
        Gradients that stayed non-finite are the user's to fix: a one-line error. A signal exits with 128 + its
        number, the status of a process it killed, so that schedulers see a pre-empted run, not a finished one."""
        if reason == "non-finite":
            saved = (f"the weights of the last good step are in {path}: resume with --resume {path} and a lower --lr "
                     "(a resumed run scales its schedule to the new value), or check the data" if path else
                     "no checkpoint was written (--no-checkpoint): lower --lr or check the data")
            raise UserError(f"the gradients were not finite at {where} ({nonfinite_in_a_row} step(s) in a row); "
                            f"{saved}")
        saved = f"checkpoint {path}; resume with --resume {path}" if path else "no checkpoint (--no-checkpoint)"
        log.info(f"=> stopped by {reason} at {where}; {saved}")
        raise SystemExit(128 + self.signum)


class SaveClock:
    """--save-every-minutes: a mid-epoch save is due ``minutes`` after the last save of any kind (0: never). The
    monotonic clock, which a step of the wall clock (NTP, a VM's clock sync) does not move."""

    def __init__(self, minutes):
        self.seconds = minutes * 60
        self.restart()

    def restart(self):
        self.last = time.monotonic()

    def due(self):
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds


def nonfinite_limit(max_nonfinite_steps, precision):
    """Non-finite steps in a row that stop a run: --max-nonfinite-steps with a loss scaler (which skips overflowing
    steps while it lowers the scale), else the first."""
    return max_nonfinite_steps if precision.has_scaler else 1


def train_one_epoch(model, criterion, optimizer, scheduler, precision, loader, runtime, epoch, log, throughput, stop,
                    *, batch_size, print_freq, max_steps=0, max_nonfinite_steps=1, start_step=0, ema=None,
                    ema_steps=1, mix=None, profiler=None, save_clock=None, save=None):
    """Train for one epoch (or to step ``max_steps``), from ``start_step`` (the loader starts there too).

    Returns the global mean loss, Acc@1, Acc@5 of the steps run, ``steps_done`` (of this epoch, counting
    ``start_step``), ``skipped_steps`` (not applied: non-finite gradients) and ``stopped``: None, or why the
    epoch ended early ('SIGTERM', 'SIGINT', 'non-finite').
    A step whose gradients are not finite is skipped. Without a loss scaler the first one stops the epoch;
    with one (which skips overflowing steps while it lowers the scale), ``max_nonfinite_steps`` in a row,
    noticed at the next printed line (the scaler's verdict stays on the device until then).
    ``mix`` (MixUp/CutMix) turns a batch's labels into soft targets for the loss; accuracy is still scored
    against each image's own label. ``ema`` is updated every ``ema_steps`` steps. ``batch_size`` (global) counts
    the progress bar's images; a line is logged every ``print_freq`` steps.
    ``loader`` yields batches already on the device (prefetch.DeviceLoader). ``profiler`` (--profile), when
    given, is told each step's end. The result's ``breakdown`` is the epoch's StepBreakdown.
    When ``save_clock`` says a save is due (the ranks agree on it with the stop check), ``save(steps_done)`` writes
    the checkpoint mid-epoch, its time left out of the step times and FPS; not after the epoch's last step, which the
    epoch's own save follows.
    """
    model.train()
    steps = start_step + len(loader)
    if max_steps:
        steps = min(steps, max_steps)
    skipped, stopped, steps_done = SkippedSteps(), None, start_step
    epoch_sums = MetricSums(runtime.device)
    progress = meters.EpochProgress(runtime, loader, epoch, steps, start_step + throughput.warmup_steps)
    # On a terminal only: log files (and pipes) get exactly the reference's lines.
    bar = tqdm(total=steps * batch_size, desc=f"Epoch {epoch}", unit="img", unit_scale=True, leave=False,
               file=sys.stdout, disable=not (runtime.is_main and interactive()))
    runtime.synchronize()
    progress.start(start_step)
    for step, (images, labels) in enumerate(loader, start_step):
        if step >= steps:
            break
        progress.batch_arrived()
        loss, output = _train_step(model, criterion, optimizer, scheduler, precision, images, labels, mix, skipped)
        steps_done = step + 1
        if ema is not None and steps_done % ema_steps == 0:
            ema.update_parameters(model)
        bar.update(batch_size)
        progress.step_done(loss, output, labels, runtime.world_size)
        epoch_sums.update(loss, output, labels)

        if step + 1 == progress.window_first_step:
            runtime.synchronize()
            progress.open_window()
        print_line = (step + 1) % print_freq == 0 or step + 1 == steps
        save_due = save_clock is not None and save_clock.due()
        stopped, save_now = _stop_reason(skipped, precision, max_nonfinite_steps, stop, runtime, print_line, save_due)
        if print_line or stopped:
            runtime.synchronize()
            progress.log_line(log, step, skipped)
        if stopped:
            break
        if profiler is not None:
            profiler.step()
        if save_now and steps_done < steps:
            save_start = time.perf_counter()
            save(steps_done)
            progress.leave_out(time.perf_counter() - save_start)
        progress.step_end()
    bar.close()

    runtime.synchronize()
    progress.add_window(throughput, steps_done)
    result = _global_means(epoch_sums, runtime, loader.skipped)
    result.update(steps_done=steps_done, skipped_steps=skipped.total(), stopped=stopped,
                  breakdown=progress.breakdown)
    return result


def _train_step(model, criterion, optimizer, scheduler, precision, images, labels, mix, skipped):
    """One optimizer step on a batch (recorded in ``skipped`` when its gradients were not finite): (loss,
    output), still on the device."""
    images, target = mix(images, labels) if mix is not None else (images, labels)
    with precision.autocast():
        output = model(images)
        loss = criterion(output, target)
    skipped.add(precision.step(loss, optimizer))
    scheduler.step()
    return loss, output


def _stop_reason(skipped, precision, max_nonfinite_steps, stop, runtime, print_line, save_due):
    """(why the epoch ends after this step: 'non-finite', the signal's name or None, whether to save now). With a
    loss scaler the non-finite count is read at printed lines only (the scaler's verdict stays on the device until
    then); the ranks agree on a signal and on a due save at printed lines."""
    if (print_line or not precision.has_scaler) and \
            skipped.longest_run() >= nonfinite_limit(max_nonfinite_steps, precision):
        return "non-finite", False
    stop_now, save_now = stop.agree(runtime, print_line, save_due)
    return (stop.name if stop_now else None), save_now


def _global_means(sums, runtime, skipped_images):
    """Global means, image count and unreadable images skipped, all ranks together."""
    local = torch.tensor([float(sums.count), float(skipped_images)], dtype=torch.float32, device=runtime.device)
    loss_sum, top1, top5, count, skipped = runtime.all_reduce_sum(torch.cat([sums.sums, local])).tolist()
    result = {"loss": float("nan"), "acc1": float("nan"), "acc5": float("nan"), "count": int(count),
              "skipped_images": int(skipped)}
    if count:
        result.update(loss=loss_sum / count, acc1=100.0 * top1 / count, acc5=100.0 * top5 / count)
    return result


def inference_model(model, fuse_bn, compile_backend=None):
    """The network validation runs: with ``fuse_bn``, an eval-mode copy with every BatchNorm folded into the
    convolution before it (the same function, a third fewer layers: 1.4x faster bf16 evaluation on the CPU;
    folding keeps the weights' memory format). --sync-bn's SyncBatchNorm layers are folded too. The trained model
    is left untouched.

    With ``compile_backend``, that copy (or a traced one) compiled by torch.compile. Under inductor, its
    ``freezing`` makes the weights constants of the graph, folded and pre-packed for the convolution kernels:
    bf16 evaluation 2.4x faster again on the CPU (bench.py). Dynamo reads the setting when it traces, at the first
    call, so it is set for the whole process; it only touches graphs traced without autograd, so the training
    model is compiled as before. Each call traces a new copy, with new code, so a later call compiles the
    weights of its own time (dynamo also guards frozen weights by identity), but torch 2.14 does not free a
    frozen compile's weights: main.py compiles only for ``-e``, which evaluates once.
    """
    model = getattr(model, "module", model)  # DDP, or swa_utils.AveragedModel for the EMA
    if fuse_bn:
        model = fuse(_plain_batchnorm(copy.deepcopy(model).eval()), inplace=True)
    if compile_backend:
        if not fuse_bn:
            model = torch.fx.symbolic_trace(copy.deepcopy(model).eval())
        if compile_backend == "inductor":
            torch._inductor.config.freezing = True
        model = torch.compile(model, backend=compile_backend)
    return model


def _plain_batchnorm(model):
    """Replace, in place, each SyncBatchNorm with running statistics by a BatchNorm2d holding the same parameters
    and statistics: torch.fx's fuse() folds only the plain classes, and in eval mode SyncBatchNorm computes as
    BatchNorm (it synchronises batch statistics, which only training uses). MnasNet's normalised inputs are all
    4-D. Returns the model."""
    for name, child in model.named_children():
        if isinstance(child, nn.SyncBatchNorm) and child.track_running_stats:
            plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   device=child.running_mean.device, dtype=child.running_mean.dtype)
            plain.load_state_dict(child.state_dict())
            setattr(model, name, plain.train(child.training))
        else:
            _plain_batchnorm(child)
    return model


@torch.no_grad()
def evaluate(model, criterion, precision, loader, runtime, log, stop, print_freq, name=""):
    """Score every readable validation image exactly once across all ranks.

    Returns global loss, Acc@1, Acc@5, ``count`` (images scored) and ``skipped_images`` (unreadable), or None
    when a one-process run was asked to stop (with several, the ranks' shards differ in length and have no
    common point to agree at, so validation runs to its end). ``name`` tags the result line (" * EMA Acc@1 ..."),
    so parsers of the reference's " * Acc@1" line still read the trained weights' score.
    """
    model.eval()
    sums = MetricSums(runtime.device)
    for step, (images, target) in enumerate(loader):
        if stop.requested(runtime, sync_point=False):
            return None
        if not len(target):
            continue  # every image of the batch was unreadable (prefetch.ToDevice drops them)
        with precision.eval_autocast():
            output = model(images)
            loss = criterion(output, target)
        sums.update(loss.float(), output.float(), target)
        if (step + 1) % print_freq == 0:
            log.info(f"Test: [{step + 1}/{len(loader)}]")
    result = _global_means(sums, runtime, loader.skipped)
    skipped = f", {result['skipped_images']} unreadable skipped" if result["skipped_images"] else ""
    log.info(f" *{' ' + name if name else ''} Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f} "
             f"({result['count']} images scored{skipped})")
    return result
