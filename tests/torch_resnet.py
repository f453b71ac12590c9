"""Helpers to compare the PyTorch ResNet of bench/torch_resnet_ibn.py (torchvision layout, IBN-b,
official key layout) with jaxreid: the reference for every conversion test."""
import sys

import torch
from torch import nn

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from torch_resnet_ibn import TORCH_DEPTHS, TorchBlock, TorchResNet  # noqa: E402

__all__ = ["TORCH_DEPTHS", "TorchBlock", "TorchResNet", "calibrate", "nhwc"]


def calibrate(module, *inputs):
  """Sets BN running stats to one batch's statistics (perturbed), IN affine to random values."""
  bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
  for m in bns:
    m.momentum = 1.0
  module.train()
  with torch.no_grad():
    module(*inputs)
    for m in module.modules():
      if isinstance(m, nn.InstanceNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
    for m in bns:
      m.weight.uniform_(0.5, 1.5)
      m.bias.normal_(0, 0.2)
      m.running_mean.add_(torch.randn_like(m.running_mean) * 0.05 * m.running_var.sqrt())
      m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25))
  module.eval()


def nhwc(x):
  return x.detach().permute(0, 2, 3, 1).numpy()
