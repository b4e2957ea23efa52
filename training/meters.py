"""Running sums and meters: device-side metric sums, skipped-step counts, averages, throughput, the step-time
breakdown and the epoch progress line."""
import time

import torch

from training.utils import count_correct


class MetricSums:
    """Running sums of loss and top-1/top-5 hits kept on the device.

    Updating never syncs with the host; ``pull()`` moves everything in one transfer, so a GPU/NPU is
    only stalled when a line is printed.
    """

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        # float32: Ascend NPUs and HCCL have little float64 support, and float32 counts exactly past ImageNet's
        # 1.28M images per epoch (to 2**24).
        self.sums = torch.zeros(3, dtype=torch.float32, device=self.device)
        self.count = 0

    def update(self, loss, output, target):
        batch = target.shape[0]
        top1, top5 = count_correct(output, target)
        self.sums += torch.stack([loss.detach().float() * batch, top1.float(), top5.float()])
        self.count += batch

    def pull(self):
        """(count, mean loss, Acc@1 %, Acc@5 %) as Python numbers, and reset."""
        loss_sum, top1, top5 = self.sums.tolist()
        count = self.count
        self.reset()
        if count == 0:
            return 0, float("nan"), float("nan"), float("nan")
        return count, loss_sum / count, 100.0 * top1 / count, 100.0 * top5 / count


class SkippedSteps:
    """Optimizer steps skipped for non-finite gradients: the total, and the longest run of them in a row.

    ``add`` takes each step's verdict: a bool, or from a loss scaler a bool tensor on the device, which is
    counted there (tensors and ints mix in the same arithmetic), so the scaler's verdict costs no host sync
    until ``total()`` or ``longest_run()`` reads it.
    """

    def __init__(self):
        self._total = self._run = self._longest = 0

    def add(self, applied):
        skipped = (~applied).int() if torch.is_tensor(applied) else int(not applied)
        self._total = self._total + skipped
        self._run = (self._run + skipped) * skipped
        self._longest = self._longest + (self._run > self._longest) * (self._run - self._longest)

    def total(self):
        return int(self._total)

    def longest_run(self):
        return int(self._longest)


class Average:
    """A host-side running mean weighted by counts."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def add(self, value, count=1):
        self.total += value * count
        self.count += count

    @property
    def mean(self):
        return self.total / self.count if self.count else float("nan")


class ThroughputMeter:
    """Global images per second over the measured window of a whole run.

    The first ``warmup_steps`` steps of every epoch are left out (loader start-up, allocator and kernel
    warm-up); the window is closed by a device sync, so queued asynchronous work is counted.
    """

    def __init__(self, warmup_steps):
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.images = 0
        self.seconds = 0.0

    @property
    def fps(self):
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def step_time_ms(self):
        return 1000.0 * self.seconds / self.steps if self.steps else float("nan")


class StepBreakdown:
    """Where a step's time goes, summed over intervals between device syncs (the printed lines' syncs, so
    measuring costs the run nothing): host time waiting for the loader's next batch (``data``), host time in the
    device stage (``copy``: prefetch.DeviceLoader's transfer calls; on CUDA/NPU they only issue the copy of a
    pinned batch to a side stream, where it overlaps the compute, so the transfer itself is not in it, but a
    device decode that blocks the host is; on the CPU they normalise the batch inline) and the rest of the
    interval (``compute``: forward, backward, optimizer, and the queued device work the sync waited for)."""

    # More of each step than this waiting for data: the loader cannot keep up.
    SLOW_LOADER_SHARE = 0.2

    def __init__(self):
        self.steps = 0
        self.wall_seconds = self.wait_seconds = self.copy_seconds = 0.0

    def add(self, steps, wall_seconds, wait_seconds, copy_seconds):
        """``wait_seconds`` is all the time spent fetching batches, ``copy_seconds`` included."""
        self.steps += steps
        self.wall_seconds += wall_seconds
        self.wait_seconds += wait_seconds
        self.copy_seconds += copy_seconds

    def merge(self, other):
        self.add(other.steps, other.wall_seconds, other.wait_seconds, other.copy_seconds)

    def _mean_ms(self, seconds):
        return 1000.0 * seconds / self.steps if self.steps else float("nan")

    def means_ms(self):
        """Mean ms per step: {"data_ms", "copy_ms", "compute_ms"}, which add up to the mean step time."""
        return {"data_ms": self._mean_ms(self.wait_seconds - self.copy_seconds),
                "copy_ms": self._mean_ms(self.copy_seconds),
                "compute_ms": self._mean_ms(self.wall_seconds - self.wait_seconds)}

    @property
    def data_share(self):
        """The share of the step time spent waiting for the loader (data_ms / step time)."""
        if not self.wall_seconds:
            return float("nan")
        return (self.wait_seconds - self.copy_seconds) / self.wall_seconds

    def slow_loader_message(self, workers, pipeline):
        """A line saying the loader cannot keep up, with what helps, or None when it keeps up."""
        if not self.data_share > self.SLOW_LOADER_SHARE:
            return None
        means = self.means_ms()
        step_ms = means["data_ms"] + means["copy_ms"] + means["compute_ms"]
        return (f"=> the data loader cannot keep up: {100 * self.data_share:.0f}% of each step "
                f"({means['data_ms']:.1f} of {step_ms:.1f} ms) waits for the next batch; more loader workers "
                f"(-j/--workers, now {workers}) or a faster --pipeline (now {pipeline}; fast decodes large JPEGs "
                f"at reduced size, gpu decodes on the CUDA device) help")


class EpochProgress:
    """The bookkeeping behind an epoch's printed lines and its measured window: the steps, data wait and metrics
    (on the device) since the last line, the epoch's running means and its StepBreakdown. The breakdown covers the
    measured window alone, the steps the FPS counts: the warm-up steps' waits (loader start-up) would otherwise
    dominate a short run's data wait share. Reads the clock only; the caller syncs the device before
    ``open_window`` and ``log_line``."""

    def __init__(self, runtime, loader, epoch, steps, window_first_step):
        self.loader, self.epoch, self.steps = loader, epoch, steps
        self.window_first_step = window_first_step
        self.interval = MetricSums(runtime.device)
        self.step_time, self.data_time, self.loss_avg, self.top1_avg, self.top5_avg = (Average() for _ in range(5))
        self.breakdown = StepBreakdown()
        self.global_batch = 0
        self.interval_steps, self.interval_data = 0, 0.0
        self.interval_start = self.last_step_end = self.window_start = None
        # The measured window's steps, data wait and copy time not yet in the breakdown, and since when.
        self.window_steps, self.window_data = 0, 0.0
        self.window_mark = self.window_copy_mark = None

    def start(self, start_step):
        self.interval_start = self.last_step_end = time.perf_counter()
        # Without warm-up steps the measured window opens now, before the first step.
        if self.window_first_step == start_step:
            self._open_window_at(self.interval_start)

    def batch_arrived(self):
        wait = time.perf_counter() - self.last_step_end
        self.interval_data += wait
        if self.window_start is not None:
            self.window_data += wait

    def step_done(self, loss, output, labels, world_size):
        self.interval.update(loss, output, labels)
        self.interval_steps += 1
        if self.window_start is not None:
            self.window_steps += 1
        self.global_batch = labels.shape[0] * world_size

    def step_end(self):
        self.last_step_end = time.perf_counter()

    def leave_out(self, seconds):
        """Take ``seconds`` spent outside the steps (a mid-epoch save) out of every span that times steps: the
        printed interval's, the FPS window's and the breakdown's since its last mark."""
        self.interval_start += seconds
        if self.window_start is not None:
            self.window_start += seconds
            self.window_mark += seconds

    def open_window(self):
        self._open_window_at(time.perf_counter())

    def _open_window_at(self, now):
        self.window_start = self.window_mark = now
        self.window_copy_mark = self.loader.copy_seconds

    def log_line(self, log, step, skipped):
        """Log the reference's line for the steps since the last one (their metrics are pulled from the device),
        then start the next interval."""
        now = time.perf_counter()
        steps, data_wait = self.interval_steps, self.interval_data
        seconds_per_step = (now - self.interval_start) / steps
        count, loss_value, top1, top5 = self.interval.pull()
        skipped_steps = skipped.total()
        self.step_time.add(seconds_per_step, steps)
        self.data_time.add(data_wait / steps, steps)
        self.loss_avg.add(loss_value, count)
        self.top1_avg.add(top1, count)
        self.top5_avg.add(top5, count)
        if self.window_steps:
            self.breakdown.add(self.window_steps, now - self.window_mark, self.window_data,
                               self.loader.copy_seconds - self.window_copy_mark)
            self.window_steps, self.window_data = 0, 0.0
            self.window_mark, self.window_copy_mark = now, self.loader.copy_seconds
        step_fps = self.global_batch / seconds_per_step
        measured = step + 1 - self.window_first_step
        mean_fps = measured * self.global_batch / (now - self.window_start) if measured > 0 else step_fps
        log.info(f"Epoch: [{self.epoch}][{step + 1}/{self.steps}]\t"
                 f"Time {seconds_per_step:.3f} ({self.step_time.mean:.3f})\t"
                 f"Data {data_wait / steps:.3f} ({self.data_time.mean:.3f})\t"
                 f"Loss {loss_value:.4e} ({self.loss_avg.mean:.4e})\t"
                 f"Acc@1 {top1:6.2f} ({self.top1_avg.mean:6.2f})\t"
                 f"Acc@5 {top5:6.2f} ({self.top5_avg.mean:6.2f})\t"
                 f"FPS {step_fps:.2f} ({mean_fps:.2f})"
                 + (f"\tSkipped {skipped_steps}" if skipped_steps else ""))
        self.interval_start = time.perf_counter()
        self.interval_steps, self.interval_data = 0, 0.0

    def add_window(self, throughput, steps_done):
        """Add the epoch's measured window to the run's throughput (the device was synced just before)."""
        measured = steps_done - self.window_first_step
        if self.window_start is not None and measured > 0:
            throughput.steps += measured
            throughput.images += measured * self.global_batch
            throughput.seconds += time.perf_counter() - self.window_start
