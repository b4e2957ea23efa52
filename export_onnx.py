"""Export a checkpoint to ONNX with a dynamic batch axis (e.g. for Ascend ATC, TensorRT or onnxruntime).

    python export_onnx.py output/model_best.pth.tar                          # -> output/model_best.onnx
    python export_onnx.py mnasnet1_0-953fb4b8.pth -a mnasnet1_0 -o mnasnet1_0.onnx --verify

Reads our checkpoints, ``module.``-prefixed ones and torchvision's state dicts. The replacement for the
reference's pthtar2onnx.py. For Ascend offline inference, tools/onnx_to_om.sh turns the file into .om models with
ATC, one per batch size (``--input_shape="input:16,3,224,224"``).
"""
from training import autoload_off  # noqa: F401  # isort: skip  (before torch: see training/autoload_off.py)

import argparse
import os
import warnings

import torch

from training import checkpoint
from training.utils import exit_on_user_error

INPUT_NAME, OUTPUT_NAME = "input", "output"


def export(model, path, image_size=224, opset=11):
    """Write ``model`` as ONNX: input ``input`` (N, 3, S, S) float32, output ``output`` (N, classes) logits."""
    example = torch.randn(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the torch.export one, which needs onnxscript and
        # writes opset 18+, newer than ATC and older runtimes read; this one still writes opset 11.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, dynamo=False)
    import onnx
    onnx.checker.check_model(onnx.load(path))


def max_difference(model, path, image_size=224, batch=3):
    """Largest absolute difference between onnxruntime's and PyTorch's logits on random images."""
    import onnxruntime

    images = torch.randn(batch, 3, image_size, image_size)
    with torch.no_grad():
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {INPUT_NAME: images.numpy()})
    return float(abs(actual - expected).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a MnasNet checkpoint to ONNX (dynamic batch axis)")
    parser.add_argument("checkpoint", help="our checkpoint, a module.-prefixed one, or a torchvision or timm file")
    parser.add_argument("-a", "--arch", default=None, help="needed when the file does not name it (torchvision, timm)")
    parser.add_argument("-o", "--output", default=None, help="default: the checkpoint's path with .onnx")
    parser.add_argument("--image-size", default=224, type=int)
    parser.add_argument("--opset", default=11, type=int)
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime's outputs with PyTorch's")
    args = parser.parse_args(argv)
    output = args.output or os.path.splitext(args.checkpoint.removesuffix(".tar"))[0] + ".onnx"
    with exit_on_user_error():
        model, _ = checkpoint.load_model(args.checkpoint, args.arch)
        export(model, output, args.image_size, args.opset)
    print(f"wrote {output}")
    if args.verify:
        print(f"onnxruntime vs PyTorch: max abs difference {max_difference(model, output, args.image_size):.2e}")


if __name__ == "__main__":
    main()
