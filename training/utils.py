"""Small shared helpers: user-facing errors, logging, metrics and seeding."""
import contextlib
import hashlib
import logging
import os
import random
import signal
import sys

import numpy as np
import torch
from tqdm import tqdm

# Ctrl-C and a scheduler's pre-emption: the run saves where it stands and stops.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class UserError(Exception):
    """A problem with the user's input; the commands print it as one line and exit with status 2."""


@contextlib.contextmanager
def exit_on_user_error():
    """A command's body: a UserError ends it as "error: ..." on stderr and exit status 2, not a traceback."""
    try:
        yield
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def first_line(exc):
    """An exception's first line, for one-line errors (its type when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def interactive():
    """Whether this process's console is a terminal: there a progress bar runs and log lines print above it."""
    return sys.stdout.isatty()


class _ConsoleAboveBar(logging.StreamHandler):
    """Console lines written through tqdm, so they land above a running progress bar instead of across it."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(output_dir, log_file, rank):
    """Rank 0 logs to stdout and ``output_dir/log_file``; other ranks write their console to ``rank<k>.log``.

    Keeping other ranks out of rank 0's log (and off the shared terminal) is what makes the log readable
    and parsable in 8-process runs.
    """
    logger = logging.getLogger("mnasnet")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if rank == 0:
        handlers = [_ConsoleAboveBar(sys.stdout) if interactive() else logging.StreamHandler(sys.stdout),
                    logging.FileHandler(os.path.join(output_dir, log_file))]
    else:
        console = open(os.path.join(output_dir, f"rank{rank}.log"), "a", buffering=1)
        sys.stdout = sys.stderr = console
        handlers = [logging.StreamHandler(console)]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed, epoch, rank):
    """A distinct seed for each (run seed, epoch, rank): augmentations differ across epochs and ranks, and a run
    resumed at an epoch boundary draws the same random numbers as an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2 ** 32


def state_digest(state):
    """SHA-256 of a state dict, bit for bit: equal only where the weights are identical."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_correct(output, target, topk=(1, 5)):
    """Number of samples whose target is in the top-k predictions, as device tensors (no host sync)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [hits[:, :min(k, maxk)].any(dim=1).sum() for k in topk]
