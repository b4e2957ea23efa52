"""One training epoch and one validation pass. Device-agnostic: everything device-specific is in ``runtime``
and ``precision`` (device.py)."""
import time

import torch

from utils import Average, MetricSums


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


def train_one_epoch(model, criterion, optimizer, scheduler, precision, loader, runtime, epoch, args, log,
                    throughput):
    """Train for one epoch (or ``args.max_steps`` steps); returns the epoch's global mean loss, Acc@1, Acc@5.

    ``loader`` yields batches already on the device (prefetch.DeviceLoader)."""
    model.train()
    steps = len(loader) if not args.max_steps else min(len(loader), args.max_steps)
    interval, epoch_sums = MetricSums(runtime.device), MetricSums(runtime.device)
    step_time, data_time, loss_avg, top1_avg, top5_avg = (Average() for _ in range(5))
    global_batch = 0
    window_start = None
    window_first_step = throughput.warmup_steps

    runtime.synchronize()
    interval_start = last_step_end = time.perf_counter()
    interval_steps, interval_data = 0, 0.0
    for step, (images, target) in enumerate(loader):
        if step >= steps:
            break
        interval_data += time.perf_counter() - last_step_end
        with precision.autocast():
            output = model(images)
            loss = criterion(output, target)
        precision.step(loss, optimizer)
        scheduler.step()
        interval.update(loss, output, target)
        epoch_sums.update(loss, output, target)
        interval_steps += 1
        global_batch = target.shape[0] * runtime.world_size

        if step + 1 == window_first_step:
            runtime.synchronize()
            window_start = time.perf_counter()
        if (step + 1) % args.print_freq == 0 or step + 1 == steps:
            runtime.synchronize()
            now = time.perf_counter()
            seconds_per_step = (now - interval_start) / interval_steps
            count, loss_value, top1, top5 = interval.pull()
            step_time.add(seconds_per_step, interval_steps)
            data_time.add(interval_data / interval_steps, interval_steps)
            loss_avg.add(loss_value, count)
            top1_avg.add(top1, count)
            top5_avg.add(top5, count)
            step_fps = global_batch / seconds_per_step
            measured = step + 1 - window_first_step
            mean_fps = measured * global_batch / (now - window_start) if measured > 0 else step_fps
            log.info(f"Epoch: [{epoch}][{step + 1}/{steps}]\t"
                     f"Time {seconds_per_step:.3f} ({step_time.mean:.3f})\t"
                     f"Data {interval_data / interval_steps:.3f} ({data_time.mean:.3f})\t"
                     f"Loss {loss_value:.4e} ({loss_avg.mean:.4e})\t"
                     f"Acc@1 {top1:6.2f} ({top1_avg.mean:6.2f})\t"
                     f"Acc@5 {top5:6.2f} ({top5_avg.mean:6.2f})\t"
                     f"FPS {step_fps:.2f} ({mean_fps:.2f})")
            interval_start = time.perf_counter()
            interval_steps, interval_data = 0, 0.0
        last_step_end = time.perf_counter()

    runtime.synchronize()
    if window_start is not None and steps > window_first_step:
        throughput.steps += steps - window_first_step
        throughput.images += (steps - window_first_step) * global_batch
        throughput.seconds += time.perf_counter() - window_start
    return _global_means(epoch_sums, runtime)


def _global_means(sums, runtime):
    totals = torch.cat([sums.sums, torch.tensor([float(sums.count)], dtype=torch.float64, device=runtime.device)])
    loss_sum, top1, top5, count = runtime.all_reduce_sum(totals).tolist()
    if count == 0:
        return {"loss": float("nan"), "acc1": float("nan"), "acc5": float("nan"), "count": 0}
    return {"loss": loss_sum / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count,
            "count": int(count)}


@torch.no_grad()
def evaluate(model, criterion, precision, loader, runtime, args, log):
    """Score every validation image exactly once across all ranks; returns global loss, Acc@1, Acc@5, count."""
    model.eval()
    sums = MetricSums(runtime.device)
    for step, (images, target) in enumerate(loader):
        with precision.eval_autocast():
            output = model(images)
            loss = criterion(output, target)
        sums.update(loss.float(), output.float(), target)
        if (step + 1) % args.print_freq == 0:
            log.info(f"Test: [{step + 1}/{len(loader)}]")
    result = _global_means(sums, runtime)
    log.info(f" * Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f}")
    return result
