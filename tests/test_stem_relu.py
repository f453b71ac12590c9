"""model.stem_relu = False: reid-strong-baseline's ResNet stem conv1 → bn1 → maxpool (its ReLU
is commented out), against a small torch model."""
import jax.numpy as jnp
import numpy as np
import torch

from jaxreid.backbones.resnet import ResNet, resnet_from_torch
from torch_resnet import TorchResNet, calibrate, nhwc


class NoStemReluResNet(TorchResNet):
  def forward(self, x, final_layer="layer4"):
    x = self.maxpool(self.bn1(self.conv1(x)))          # no ReLU after the stem BN
    for i in range(1, int(final_layer[-1]) + 1):
      x = getattr(self, f"layer{i}")(x)
    return x


def test_resnet_without_stem_relu_equals_torch():
  torch.manual_seed(0)
  model = NoStemReluResNet(18, False, 8)
  images = torch.rand(2, 3, 64, 32) - 0.5
  calibrate(model, images)
  with torch.no_grad():
    want = nhwc(model(images))
    with_relu = nhwc(TorchResNet.forward(model, images, "layer4"))
  params, stats = resnet_from_torch(model.state_dict(), "", "layer4")
  variables = {"params": params, "batch_stats": stats}
  x = jnp.asarray(nhwc(images))
  flax = ResNet(depth=18, final_layer="layer4", width=8, freeze_bn=False)
  got = np.asarray(flax.clone(stem_relu=False).apply(variables, x))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(flax.apply(variables, x)), with_relu, atol=1e-4,
                             rtol=1e-4)                  # the default keeps the ReLU
  assert np.abs(want - with_relu).max() > 1e-2
