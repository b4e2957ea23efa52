"""training/transforms.py: any image mode becomes RGB, augmentations keep shapes, MixUp/CutMix give soft targets."""
import torch
from PIL import Image

from training import transforms


def test_transforms_accept_grey_cmyk_palette_images():
    for mode in ("L", "CMYK", "P", "RGBA"):
        image = Image.new(mode, (30, 20))
        assert transforms.train_transform(64, scale=(0.35, 1.0))(image).shape == (3, 64, 64)
        assert transforms.val_transform(64, 64)(image).shape == (3, 64, 64)


def test_augmentations_keep_shape():
    image = Image.new("RGB", (50, 40), (120, 30, 200))
    for auto_augment in transforms.AUTO_AUGMENT:
        out = transforms.train_transform(32, auto_augment=auto_augment, random_erase=1.0)(image)
        assert out.shape == (3, 32, 32) and (out == 0).any()  # erased patch filled with 0


def test_batch_mix_gives_soft_targets():
    assert transforms.batch_mix(3) is None
    mix = transforms.batch_mix(3, mixup_alpha=0.2, cutmix_alpha=1.0)
    images, target = mix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0], dtype=torch.int32))
    assert images.shape == (4, 3, 8, 8) and target.shape == (4, 3)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(4))
