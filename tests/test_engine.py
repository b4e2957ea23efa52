"""training/engine.py: the validation copy with BatchNorm folded, and what a stop on non-finite gradients says."""
import logging

import pytest
import torch
import torch.nn as nn

import mnasnet
from training import engine
from training.utils import UserError


def test_fuse_bn_folds_sync_batchnorm_and_scores_the_same():
    torch.manual_seed(0)
    model = mnasnet.ARCHS["mnasnet0_5"](num_classes=5)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 48, 48))  # running statistics that are not the initial 0 and 1
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    images = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        expected = model(images)
        folded = engine.inference_model(model, fuse_bn=True)
        norms = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert not norms
        torch.testing.assert_close(folded(images), expected, rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())  # the trained model is untouched


@pytest.mark.parametrize("path", ["out/checkpoint.pth.tar", None])
def test_the_non_finite_stop_says_what_was_saved(path):
    with pytest.raises(UserError) as error:
        engine.StopRequest().end_run("non-finite", "epoch 0, step 3/4", path, 1, logging.getLogger("test"))
    message = str(error.value)
    assert message.startswith("the gradients were not finite at epoch 0, step 3/4 (1 step(s) in a row); ")
    if path:
        assert f"the weights of the last good step are in {path}: resume with --resume {path} and a lower --lr" \
            in message
    else:
        assert "no checkpoint was written (--no-checkpoint): lower --lr or check the data" in message
