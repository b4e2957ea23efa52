"""A CPU stand-in for the ``torch.load`` that torch_npu installs, for its ``weights_only=True`` errors.

Mirrored from torch_npu 2.14.0, torch_npu/utils/serialization.py: ``_add_serialization_methods`` sets
``torch.load = load``; ``load``'s weights-only branches (zip and legacy files) open the file as torch.load does, then
catch a ``RuntimeError`` from ``_load`` / ``_legacy_load`` and raise ``pickle.UnpicklingError(_get_wo_message(str(e)) +
pta_error(ErrCode.SYSCALL)) from None``: a damaged archive (a record that cannot be read) reads as a refused pickle,
with the ``RuntimeError`` left as the new error's ``__context__``. ``_get_wo_message`` is copied from the same
function; ``pta_error`` (torch_npu/utils/_error_code.py) appends an ``[ERROR] ... ERR00010 PTA system call failed``
line, here with device and rank -1, as torch_npu writes them when it cannot ask. Loads with ``weights_only=False``
go to torch's own ``torch.load``.
"""
import os
import pickle
import re
import time

import torch
from torch.serialization import (UNSAFE_MESSAGE, _is_zipfile, _legacy_load, _load, _open_file_like,
                                 _open_zipfile_reader, _weights_only_unpickler)

torch_load = torch.load


def _pta_syscall_error():
    return (f"\n[ERROR] {time.strftime('%Y-%m-%d-%H:%M:%S', time.localtime())} (PID:{os.getpid()}, Device:-1, "
            "RankID:-1) ERR00010 PTA system call failed")


def _get_wo_message(message):
    docs_message = ("\n\nCheck the documentation of torch.load to learn more about types accepted by default with "
                    "weights_only.")
    has_unsafe_global = re.search(r"GLOBAL (\S+) was not an allowed global by default.", message) is not None
    has_blocklist = re.search(r"whose module (\S+) is blocked", message) is not None
    has_import = re.search(r"(\S+) must be (\S+) to load", message) is not None
    if has_unsafe_global:
        updated_message = (
            "Weights only load failed. This file can still be loaded, to do so you have two options, "
            "\033[1mdo those steps only if you trust the source of the checkpoint\033[0m. "
            f"\n\t(1) {UNSAFE_MESSAGE}\n\t(2) Alternatively, to load with `weights_only=True` please check "
            "the recommended steps in the following error message.\n\tWeightsUnpickler error: " + message)
    else:
        if has_import:
            return f"Weights only load failed. {message}\n {UNSAFE_MESSAGE}\n"
        updated_message = f"Weights only load failed. {UNSAFE_MESSAGE}\n"
        if not has_blocklist:
            updated_message += ("Please file an issue with the following so that we can make "
                                "`weights_only=True` compatible with your use case: WeightsUnpickler error: ")
        updated_message += message
    return updated_message + docs_message


def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **pickle_load_args):
    if not weights_only:
        return torch_load(f, map_location, pickle_module, weights_only=weights_only, mmap=mmap, **pickle_load_args)
    pickle_load_args.setdefault("encoding", "utf-8")
    with _open_file_like(f, "rb") as opened_file:
        if _is_zipfile(opened_file):
            with _open_zipfile_reader(opened_file) as opened_zipfile:
                try:
                    return _load(opened_zipfile, map_location, _weights_only_unpickler, overall_storage=None,
                                 **pickle_load_args)
                except RuntimeError as e:
                    raise pickle.UnpicklingError(_get_wo_message(str(e)) + _pta_syscall_error()) from None
        try:
            return _legacy_load(opened_file, map_location, _weights_only_unpickler, **pickle_load_args)
        except RuntimeError as e:
            raise pickle.UnpicklingError(_get_wo_message(str(e)) + _pta_syscall_error()) from None
