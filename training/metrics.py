"""Per-epoch metrics: a CSV in the output folder, optional TensorBoard scalars, and a PNG of the curves.

    python -m training.metrics output/metrics.csv        # redraw output/metrics.png from the CSV
"""
import argparse
import csv
import math
import os

from training.utils import UserError, exit_on_user_error

CSV_NAME = "metrics.csv"
PNG_NAME = "metrics.png"
# data_ms, copy_ms, compute_ms: the epoch's mean step, split as meters.StepBreakdown measures it.
FIELDS = ("epoch", "train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5", "lr", "images_per_s",
          "epoch_seconds", "ema_val_loss", "ema_val_acc1", "ema_val_acc5", "data_ms", "copy_ms", "compute_ms")


def _cell(value):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""  # not measured (e.g. --no-val): an empty cell, never a fake number
    return f"{value:.6g}" if isinstance(value, float) else value


def tensorboard_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or a one-line error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


class MetricsLog:
    """One CSV row per finished epoch, appended and flushed as the run goes.

    A run starting at epoch N keeps the rows of epochs before N and drops the rest, so a run resumed from a
    checkpoint ends with exactly one row per epoch, whatever the interrupted run had written after it.
    """

    def __init__(self, output_dir, start_epoch, tensorboard=False):
        self.path = os.path.join(output_dir, CSV_NAME)
        kept = [row for row in read_rows(self.path) if int(row["epoch"]) < start_epoch] \
            if start_epoch > 0 and os.path.isfile(self.path) else []
        tmp_path = self.path + ".tmp"
        with open(tmp_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows({key: row.get(key, "") for key in FIELDS} for row in kept)
        os.replace(tmp_path, self.path)
        self.tensorboard = None
        if tensorboard:
            # purge_step drops events an interrupted run logged past the resumed epoch.
            self.tensorboard = tensorboard_writer_class()(os.path.join(output_dir, "tensorboard"),
                                                          purge_step=start_epoch)

    def write(self, **row):
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, FIELDS).writerow({key: _cell(row.get(key)) for key in FIELDS})
        if self.tensorboard is not None:
            for key in FIELDS[1:]:
                value = row.get(key)
                if value is not None and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_rows(path):
    if not os.path.isfile(path):
        raise UserError(f"metrics file not found: {path}")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _series(rows, key):
    points = [(int(row["epoch"]), float(row[key])) for row in rows if row.get(key)]
    return [epoch for epoch, _ in points], [value for _, value in points]


def default_png(csv_path):
    return os.path.join(os.path.dirname(os.path.abspath(csv_path)), PNG_NAME)


def plot_curves(csv_path, png_path):
    """Draw loss and accuracy per epoch from the CSV into a PNG; returns {curve label: number of points}."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed: training nodes have none
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(11, 4))
    points = {}
    for axes, curves in ((loss_axes, (("train_loss", "train loss"), ("val_loss", "val loss"),
                                      ("ema_val_loss", "EMA val loss"))),
                         (acc_axes, (("train_acc1", "train Acc@1"), ("val_acc1", "val Acc@1"),
                                     ("val_acc5", "val Acc@5"), ("ema_val_acc1", "EMA val Acc@1")))):
        for key, label in curves:
            epochs, values = _series(rows, key)
            if epochs:
                axes.plot(epochs, values, marker=".", label=label)
                points[label] = len(epochs)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    loss_axes.set_ylabel("loss")
    acc_axes.set_ylabel("accuracy (%)")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return points


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot a run's per-epoch loss and accuracy from its metrics.csv")
    parser.add_argument("csv", help="metrics.csv written by main.py")
    parser.add_argument("-o", "--output", default=None, help="PNG to write; default: metrics.png beside the CSV")
    args = parser.parse_args(argv)
    png_path = args.output or default_png(args.csv)
    with exit_on_user_error():
        points = plot_curves(args.csv, png_path)
    print(f"wrote {png_path} ({', '.join(f'{label}: {n}' for label, n in points.items())} points)")


if __name__ == "__main__":
    main()
