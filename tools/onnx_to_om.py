"""Convert export_onnx.py's file to Ascend offline models (.om), one per batch size, with CANN's ATC.

    python export_onnx.py output/model_best.pth.tar                       # -> output/model_best.onnx
    tools/onnx_to_om.sh output/model_best.onnx --soc-version Ascend910B3 --batch-sizes 1,16,64

Checks the ONNX file's input first (export_onnx.py's name "input", shape (batch, 3, H, W) with H and W fixed),
then, for each batch size, runs

    atc --model=M.onnx --framework=5 --output=M_bs16 --input_format=NCHW --input_shape=input:16,3,224,224
        --soc_version=Ascend910B3 --log=error

where CANN is installed (atc on PATH: tools/onnx_to_om.sh sources CANN's set_env.sh through test/env_npu.sh), and
prints the exact commands elsewhere, to run on a machine with CANN. ATC writes M_bs16.om (it adds the suffix).
--soc_version is the chip the model will run on: ``npu-smi info``'s Name with "Ascend" before it (Ascend910B3,
Ascend310P3); on Atlas A3, ``npu-smi info -t board -i ID -c CHIP``'s Chip Name and NPU Name joined by "_".
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import autoload_off  # noqa: E402,F401  # isort: skip  (before torch, see training/autoload_off.py)

import argparse  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import onnx  # noqa: E402

from export_onnx import INPUT_NAME  # noqa: E402
from training.utils import UserError, exit_on_user_error  # noqa: E402

ATC_LOG_LEVELS = ("debug", "info", "warning", "error", "null")


def input_shape(path):
    """(batch, channels, height, width) of the file's one image input, batch None when dynamic; UserError when
    the file is not export_onnx.py's kind of model."""
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception as exc:
        raise UserError(f"{path}: not a readable ONNX file ({exc})") from None
    weights = {initializer.name for initializer in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    names = [value.name for value in inputs]
    if names != [INPUT_NAME]:
        raise UserError(f"{path}: the model's inputs are {names}, expected one named {INPUT_NAME!r} "
                        "(export_onnx.py's)")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [dim.dim_value if dim.HasField("dim_value") else None for dim in dims]
    if len(shape) != 4 or shape[1] != 3 or not (shape[2] and shape[3]):
        shown = ",".join(str(size) if size is not None else "?" for size in shape)
        raise UserError(f"{path}: input {INPUT_NAME!r} has shape ({shown}), expected (batch,3,H,W) with H and W fixed: "
                        "export it with export_onnx.py")
    return tuple(shape)


def atc_commands(path, soc_version, batch_sizes, output_dir=None, log="error"):
    """{batch size: its ATC command line (an argv list)}; ATC writes <--output>.om."""
    batch, channels, height, width = input_shape(path)
    fixed = [size for size in batch_sizes if batch is not None and size != batch]
    if fixed:
        raise UserError(f"{path}: the batch size is fixed at {batch} in the file, so it cannot be converted for "
                        f"batch size(s) {fixed}: re-export with export_onnx.py (dynamic batch axis)")
    stem = os.path.splitext(os.path.basename(path))[0]
    prefix = os.path.join(output_dir if output_dir is not None else os.path.dirname(path), stem)
    return {size: ["atc", f"--model={path}", "--framework=5", f"--output={prefix}_bs{size}", "--input_format=NCHW",
                   f"--input_shape={INPUT_NAME}:{size},{channels},{height},{width}", f"--soc_version={soc_version}",
                   f"--log={log}"] for size in batch_sizes}


def parse_batch_sizes(text):
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise UserError(f"--batch-sizes must list distinct positive integers, e.g. 1,16,64; got {text!r}")
    return sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description="ONNX (export_onnx.py) to Ascend .om files with ATC, one per "
                                                 "batch size; prints the commands where ATC is not installed",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("onnx", help="export_onnx.py's output")
    parser.add_argument("--soc-version", required=True,
                        help="the target chip, ATC's --soc_version: 'Ascend' + npu-smi info's Name, e.g. Ascend910B3")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated; one .om file each")
    parser.add_argument("--output-dir", default=None, help="where the .om files go; unset: next to the ONNX file")
    parser.add_argument("--log", default="error", choices=ATC_LOG_LEVELS, help="ATC's log level")
    parser.add_argument("--print-only", action="store_true", help="print the commands even where ATC is installed")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if not re.fullmatch(r"Ascend\w+", args.soc_version):
            raise UserError(f"--soc-version {args.soc_version!r} is not a chip name such as Ascend910B3 or "
                            "Ascend310P3 ('Ascend' + the Name that npu-smi info shows)")
        if not os.path.isfile(args.onnx):
            raise UserError(f"{args.onnx}: no such file (write it with export_onnx.py)")
        commands = atc_commands(args.onnx, args.soc_version, parse_batch_sizes(args.batch_sizes), args.output_dir,
                                args.log)
        atc = None if args.print_only else shutil.which("atc")
        if atc is None:
            if not args.print_only:
                print("atc is not on PATH (CANN's set_env.sh not sourced, or CANN not installed): run these where "
                      "CANN is installed, or use tools/onnx_to_om.sh there", file=sys.stderr)
            for command in commands.values():
                print(shlex.join(command))
            return
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
        for size, command in commands.items():
            print(shlex.join(command), flush=True)
            returncode = subprocess.run(command).returncode
            if returncode != 0:
                raise UserError(f"atc failed (exit status {returncode}) for batch size {size}: see its messages "
                                "above")


if __name__ == "__main__":
    main()
