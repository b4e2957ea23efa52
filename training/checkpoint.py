"""Checkpoints: written atomically by one rank, read with ``weights_only=True``, prefixes tolerated."""
import collections
import os
import pickle
import random
import shutil
import tempfile
import zipfile

import numpy as np
import torch

import mnasnet
from training import devices, timm_keys
from training.utils import UserError, first_line

CHECKPOINT_NAME = "checkpoint.pth.tar"
AUTO = "auto"  # --resume auto: the output folder's checkpoint, if any
BEST_NAME = "model_best.pth.tar"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# What --resume needs besides the weights.
RUN_STATE_KEYS = ("epoch", "best_acc1", "optimizer", "scheduler")


def plain_args(args):
    """The command line as plain types, so the checkpoint stays loadable with weights_only=True."""
    plain = {}
    for key, value in vars(args).items():
        if isinstance(value, (list, tuple)):
            value = list(value)
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            value = str(value)
        plain[key] = value
    return plain


TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".pth.tar"


def _atomic_write(write, path):
    """Write to a temporary file in the target folder, flush it to disk, then rename over ``path``.

    A crash (or kill -9) mid-write leaves the previous file untouched, and the temporary file behind for
    ``remove_interrupted_writes`` to clear at the next start.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_checkpoint(state, is_best, output_dir, best=None):
    """``checkpoint.pth.tar`` always, and ``model_best.pth.tar`` when it is the best so far: a copy, or ``best``
    when given (the checkpoint with the EMA weights as its ``state_dict``, when those scored higher)."""
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    try:
        _atomic_write(lambda handle: torch.save(state, handle), path)
        if is_best:
            _atomic_write(lambda handle: torch.save(state if best is None else best, handle),
                          os.path.join(output_dir, BEST_NAME))
    except OSError as exc:
        raise UserError(f"cannot write checkpoint in {output_dir}: {exc.strerror or exc}") from None
    return path


def output_checkpoint(output_dir):
    """The path of ``output_dir``'s checkpoint (the one every save replaces), or None where there is none."""
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    return path if os.path.isfile(path) else None


def resume_path(args, classes):
    """The checkpoint the run continues ('' for a new run): --resume PATH, or with --resume auto --output-dir's
    checkpoint when there is one. A checkpoint of another run is refused with a one-line error: with --resume auto
    one that ``args`` and the data's ``classes`` (None: synthetic data) cannot continue, without --resume any that
    this run's saves would replace (--no-checkpoint and -e runs write none)."""
    found = output_checkpoint(args.output_dir)
    if args.resume != AUTO:
        if found and not args.resume and not (args.no_checkpoint or args.evaluate):
            raise UserError(f"--output-dir {args.output_dir} holds another run's checkpoint ({found}), which this run "
                            "would replace: add --resume auto to continue that run, or choose another --output-dir "
                            "for a new one")
        return args.resume
    if found is None:
        if args.evaluate:
            raise UserError(f"-e --resume auto: --output-dir {args.output_dir} holds no {CHECKPOINT_NAME} to evaluate")
        return ""
    if not args.evaluate:
        differences = run_differences(load_file(found), args, classes)
        if differences:
            raise UserError(f"--resume auto: {found} is another run's checkpoint: {'; '.join(differences)}; choose "
                            "another --output-dir for this run")
    return found


def run_differences(state, args, classes):
    """What keeps the run of ``args`` on ``classes`` from continuing the checkpoint ``state``: its arch, global
    batch, classes, or its having trained all of --epochs; [] when nothing does."""
    if not isinstance(state, dict) or missing_run_state(state):
        return ["it is not a checkpoint of a training run"]
    saved_args = state.get("args") or {}
    differences = []
    if state.get("arch") != args.arch:
        differences.append(f"-a {state.get('arch')} (this run: {args.arch})")
    if saved_args.get("batch_size", args.batch_size) != args.batch_size:
        differences.append(f"global batch -b {saved_args['batch_size']} (this run: {args.batch_size})")
    saved_classes = state.get("classes")
    num_classes = len(classes) if classes is not None else state.get("num_classes")
    if state.get("num_classes") != num_classes:
        differences.append(f"{state.get('num_classes')} classes (this run's data: {num_classes})")
    elif saved_classes is not None and classes is not None and list(saved_classes) != list(classes):
        differences.append("other class folders than this run's data")
    elif (saved_classes is None) != (classes is None):
        differences.append("synthetic data (this run: an image folder)" if saved_classes is None
                           else "an image folder (this run: synthetic data)")
    if state["epoch"] >= args.epochs:
        differences.append(f"it has finished its {state['epoch']} epochs, all of --epochs {args.epochs} (a larger "
                           "--epochs trains on)")
    return differences


def rng_state(device_kind):
    """This process's random number generators, in types that weights_only loading accepts."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    module = devices.device_module(device_kind)
    if module is not None:
        state["device"] = module.get_rng_state()
    return state


def restore_rng_state(state, device_kind):
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = dict(numpy_state["state"], key=numpy_state["state"]["key"].numpy().astype(np.uint32))
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    module = devices.device_module(device_kind)
    if module is not None and "device" in state:
        module.set_rng_state(state["device"])


def estimated_size(model):
    """Bytes of a checkpoint of ``model`` with SGD momentum: its state dict and a buffer per parameter."""
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return state_bytes + sum(p.numel() * p.element_size() for p in model.parameters())


def remove_interrupted_writes(output_dir):
    """Delete the temporary files of checkpoint writes that were killed before their rename; their paths."""
    stale = [os.path.join(output_dir, name) for name in sorted(os.listdir(output_dir))
             if name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)]
    for path in stale:
        os.remove(path)
    return stale


def check_free_space(output_dir, model):
    """Fail at start, not after the first epoch, when the checkpoints cannot fit: a new checkpoint and a new
    best model are each written beside the previous ones before replacing them."""
    needed = 2 * estimated_size(model)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UserError(f"--output-dir {output_dir} has {free / 2 ** 20:.1f} MiB free, checkpoints need about "
                        f"{needed / 2 ** 20:.1f} MiB; free some space, choose another --output-dir, or pass "
                        "--no-checkpoint")


def load_file(path):
    """Load a checkpoint or weights file on the CPU, refusing anything that is not plain tensors and types."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file fails in many ways: RuntimeError, EOFError, UnicodeDecodeError ...
        # torch.load re-raises the unpickler's refusal inside its advice, the refusal kept as __context__; torch_npu's
        # torch.load re-raises a record's read error (a RuntimeError) so too.
        cause = exc.__context__ if isinstance(exc, pickle.UnpicklingError) and exc.__context__ else exc
        damaged = _damaged_record(path)
        if isinstance(cause, pickle.UnpicklingError) and damaged is None:
            raise UserError(f"refusing to load {path}: it holds pickled objects that weights_only loading does not "
                            f"allow (it could run code) - {first_line(cause)}") from None
        where = f" ({damaged} is damaged)" if damaged else ""
        raise UserError(f"cannot read checkpoint {path}: {first_line(cause)}{where}") from None


def _damaged_record(path):
    """The first record of a zip file (torch.save's format) that fails its CRC check or cannot be read, or None,
    also for a file that is not a readable zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def model_state(obj):
    """The model's state dict from a file's content: ours (``state_dict``), ``model``-keyed, or a bare state dict,
    with any ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefixes removed."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError("the file holds no model state dict")
    state = collections.OrderedDict((_strip_prefixes(key), value) for key, value in obj.items())
    metadata = getattr(obj, "_metadata", None)
    if metadata is not None:
        # Keeps the version marker that MnasNet's loader uses to read torchvision's version-1 checkpoints.
        state._metadata = _strip_metadata(metadata)
    return state


def layout_version(obj):
    """The layout version at the root of a loaded file's model state (MnasNet-B1: torchvision's 1 or 2), or None;
    a file without a model state dict is left for the loader to report."""
    try:
        metadata = getattr(model_state(obj), "_metadata", None) or {}
    except UserError:
        return None
    return metadata.get("", {}).get("version")


def _strip_metadata(metadata):
    """Metadata keyed by module path, wrappers removed. A wrapper's own entry and its inner module's both
    become the root's: the inner module's (the longer path) wins, as its version says how its keys are laid
    out; the wrapper's (nn.Module's default, version 1) would make MnasNet read a version-1 stem."""
    stripped = collections.OrderedDict()
    for path in sorted(metadata, key=len):
        # Paths have no trailing dot ("module", "module.layers"); add one so the key prefixes match.
        stripped[_strip_prefixes(path + ".")[:-1]] = metadata[path]
    return stripped


def _strip_prefixes(key):
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def missing_run_state(obj):
    """What a loaded file lacks for --resume to go on with its run: all of it for a bare weights file."""
    if not isinstance(obj, dict):
        return list(RUN_STATE_KEYS)
    return [key for key in RUN_STATE_KEYS if key not in obj]


# The final Linear's weight: B1's (torchvision's layout) and A1's (timm's).
CLASSIFIER_KEYS = ("classifier.1.weight", "classifier.weight")


def classifier_weight(state):
    """The classifier's weight in a model state dict of either layout, or None."""
    return next((state[key] for key in CLASSIFIER_KEYS if key in state), None)


def _in_layout_of(state, own):
    """``state`` renamed to ``own``'s layout where it is a timm B1 file and ``own`` torchvision's."""
    if timm_keys.is_timm_layout(state) and not timm_keys.is_timm_layout(own):
        return timm_keys.b1_from_timm(state)
    return state


def fitting_archs(state):
    """The archs whose model has exactly ``state``'s keys and shapes (timm's B1 keys renamed for B1)."""
    classifier = classifier_weight(state)
    if classifier is None:
        return []
    fits = []
    for name, builder in mnasnet.ARCHS.items():
        with torch.device("meta"):  # shapes only: no memory, no init work
            own = builder(num_classes=classifier.shape[0]).state_dict()
        renamed = _in_layout_of(state, own)
        if set(renamed) == set(own) and all(renamed[key].shape == own[key].shape for key in own):
            fits.append(name)
    return fits


def _fit_hint(state):
    fits = fitting_archs(state)
    if fits:
        return f"it holds -a {' / '.join(fits)} weights"
    return f"it fits none of the archs ({', '.join(mnasnet.ARCHS)})"


def load_model_weights(model, obj, arch, source):
    """Load a loaded file's model state into ``model``, with a one-line error naming what does not fit.

    Reads our files, torchvision's and timm's (``mnasnet_*`` B1 keys are renamed to torchvision's layout; A1 has
    timm's keys)."""
    saved_arch = obj.get("arch") if isinstance(obj, dict) else None
    # timm's train.py records its own model name.
    saved_arch = timm_keys.TIMM_ARCHS.get(saved_arch, saved_arch)
    if isinstance(saved_arch, str) and saved_arch != arch:
        raise UserError(f"{source} holds a {saved_arch} model, but -a/--arch is {arch}")
    own = model.state_dict()
    saved = model_state(obj)
    state = _in_layout_of(saved, own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"{source} does not fit {arch}: {len(missing)} missing keys (e.g. {missing[:2]}), "
                        f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]}); {_fit_hint(saved)}")
    trained, wanted = classifier_weight(state).shape[0], classifier_weight(own).shape[0]
    if trained != wanted:
        raise UserError(f"{source} was trained for {trained} classes, but the data has {wanted}")
    try:
        # Other shape differences are left to the model: MnasNet reads torchvision's version-1 files itself.
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"{source} does not fit {arch}: {detail[:300]}; {_fit_hint(saved)}") from None


def load_model(path, arch=None):
    """An eval-mode model built and loaded from a weights file (ours, ``module.``-prefixed, torchvision's or timm's).

    The arch comes from the file when it names one; bare state dicts (torchvision's, timm's) need ``arch``. Returns
    (model, the loaded file's content).
    """
    obj = load_file(path)
    saved_arch = obj.get("arch") if isinstance(obj, dict) else None
    arch = arch or timm_keys.TIMM_ARCHS.get(saved_arch, saved_arch)
    if arch is None:
        archs = ", ".join(sorted(mnasnet.ARCHS))
        raise UserError(f"{path} does not say which model it holds; give -a/--arch ({archs})")
    if arch not in mnasnet.ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(sorted(mnasnet.ARCHS))}")
    classifier = classifier_weight(model_state(obj))
    if classifier is None:
        raise UserError(f"{path} holds no MnasNet classifier ({' or '.join(CLASSIFIER_KEYS)})")
    model = mnasnet.ARCHS[arch](num_classes=classifier.shape[0])
    load_model_weights(model, obj, arch, path)
    return model.eval(), obj
