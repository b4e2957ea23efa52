"""Classify image files with a checkpoint and print each one's top-5 classes by name (on the CPU).

    python classify.py output/model_best.pth.tar cat.jpg dog.png
    python classify.py mnasnet1_0-953fb4b8.pth -a mnasnet1_0 cat.jpg          # torchvision's weights

Names are the class folder names stored in our checkpoints; a 1000-class model whose file names none, or
whose folders are WordNet ids (n01440764 ...), gets the ImageNet names torchvision ships.
"""
from training import autoload_off  # noqa: F401  # isort: skip  (before torch: see training/autoload_off.py)

import argparse
import re

import torch
from PIL import Image, UnidentifiedImageError

from training import checkpoint, transforms
from training.utils import UserError, exit_on_user_error

IMAGENET_CLASSES = 1000
_WORDNET_ID = re.compile(r"n\d{8}")


def imagenet_names():
    """ImageNet-1k names in class-index order (sorted WordNet ids), from torchvision's weight metadata."""
    from torchvision.models import MNASNet1_0_Weights
    return list(MNASNet1_0_Weights.IMAGENET1K_V1.meta["categories"])


def class_names(saved, num_classes):
    """A display name for each class index."""
    folders = saved.get("classes") if isinstance(saved, dict) else None
    if folders is not None and len(folders) != num_classes:
        folders = None
    if num_classes == IMAGENET_CLASSES and (folders is None or all(_WORDNET_ID.fullmatch(f) for f in folders)):
        names = imagenet_names()
        return names if folders is None else [f"{name} ({folder})" for name, folder in zip(names, folders)]
    return list(folders) if folders is not None else [str(i) for i in range(num_classes)]


def eval_sizes(saved):
    """The resize, crop and interpolation the model was validated with, when the checkpoint recorded them."""
    args = saved.get("args") if isinstance(saved, dict) else None
    args = args if isinstance(args, dict) else {}
    interpolation = args.get("interpolation") if args.get("interpolation") in transforms.INTERPOLATIONS else "bilinear"
    return args.get("val_resize_size") or 256, args.get("val_crop_size") or 224, interpolation


def load_image(path, transform):
    try:
        with Image.open(path) as image:
            return transform(image)
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None


@torch.no_grad()
def classify(model, names, paths, transform, topk=5):
    """[(path, [(probability, name), ...]), ...] with the top-k classes of each image."""
    results = []
    for path in paths:
        probabilities = model(load_image(path, transform).unsqueeze(0)).softmax(dim=1)[0]
        top = probabilities.topk(min(topk, len(names)))
        results.append((path, [(float(p), names[i]) for p, i in zip(top.values, top.indices)]))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="Top-5 classes of image files, by name")
    parser.add_argument("checkpoint", help="our checkpoint, a module.-prefixed one, or a torchvision or timm file")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("-a", "--arch", default=None, help="needed when the file does not name it (torchvision, timm)")
    parser.add_argument("--topk", default=5, type=int)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        model, saved = checkpoint.load_model(args.checkpoint, args.arch)
        names = class_names(saved, model.num_classes)
        transform = transforms.val_transform(*eval_sizes(saved))
        for path, top in classify(model, names, args.images, transform, args.topk):
            print(path)
            for probability, name in top:
                print(f"  {100 * probability:6.2f}%  {name}")


if __name__ == "__main__":
    main()
