"""The run's summary: its figures, filled in as it goes and written as --summary-json (the test/ launchers read it)."""
import json
import math
import time

from training import meters


class RunSummary:
    """The summary of one process's run; ``fields`` is what the JSON file holds."""

    def __init__(self, args, runtime, started):
        self.path = args.summary_json if runtime.is_main else None
        self.runtime = runtime
        self.started = started  # time.perf_counter() at the run's start
        self.fields = {"arch": args.arch, "device_type": runtime.kind, "world_size": runtime.world_size,
                       "batch_size": args.batch_size, "epochs": 0, "train_steps": 0, "train_loss": None,
                       "train_acc1": None, "val_loss": None, "val_acc1": None, "val_acc5": None, "val_images": None,
                       "train_skipped_images": 0, "val_skipped_images": 0, "skipped_steps": 0, "stopped": None,
                       "history": [], **breakdown_fields(meters.StepBreakdown())}

    def update(self, **fields):
        self.fields.update(fields)

    def add_training(self, stats, first_step, run_breakdown):
        """One epoch's training figures (from ``first_step``), and the run's step breakdown so far."""
        fields = self.fields
        fields.update(breakdown_fields(run_breakdown))
        fields.update(epochs=fields["epochs"] + 1, train_steps=fields["train_steps"] + stats["steps_done"] - first_step,
                      train_loss=stats["loss"], train_acc1=stats["acc1"],
                      train_skipped_images=stats["skipped_images"],
                      skipped_steps=fields["skipped_steps"] + stats["skipped_steps"])

    def add_validation(self, val_stats, ema_stats=None):
        """evaluate()'s results for the weights and, with --model-ema, their EMA."""
        self.fields.update(val_loss=val_stats["loss"], val_acc1=val_stats["acc1"], val_acc5=val_stats["acc5"],
                           val_images=val_stats["count"], val_skipped_images=val_stats["skipped_images"])
        if ema_stats:
            self.fields.update(ema_val_loss=ema_stats["loss"], ema_val_acc1=ema_stats["acc1"],
                               ema_val_acc5=ema_stats["acc5"])

    def add_epoch(self, epoch, train_stats, val_acc1):
        """The epoch's row of the history."""
        self.fields["history"].append({"epoch": epoch, "train_loss": train_stats["loss"],
                                       "train_acc1": train_stats["acc1"], "val_acc1": val_acc1,
                                       "train_skipped_images": train_stats["skipped_images"],
                                       "skipped_steps": train_stats["skipped_steps"],
                                       **train_stats["breakdown"].means_ms()})

    def write(self, log, throughput=None):
        """Complete the summary (with the throughput meter's figures when given: -e measures none) and write it."""
        if throughput is not None:
            self.fields.update(measured_steps=throughput.steps, measured_images=throughput.images,
                               measured_seconds=throughput.seconds, fps=throughput.fps,
                               step_time_ms=throughput.step_time_ms)
            log.info(f"=> mean FPS {throughput.fps:.2f} over {throughput.steps} measured steps "
                     f"({throughput.step_time_ms:.1f} ms/step)")
        self.fields["e2e_seconds"] = time.perf_counter() - self.started
        peak = self.runtime.max_memory_allocated()
        self.fields["peak_device_memory_mb"] = peak / 2 ** 20 if peak is not None else None
        if self.path:
            with open(self.path, "w") as handle:
                json.dump(_finite(self.fields), handle, indent=2)


def breakdown_fields(breakdown):
    """The run's mean step, split (data_ms, copy_ms, compute_ms), and the share of it spent waiting for data."""
    return {**breakdown.means_ms(), "data_wait_share": breakdown.data_share}


def _finite(value):
    """JSON has no NaN: a metric that could not be computed is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
