"""The whole official release file (`nformer_model.pth` = state_dict of `nformer_model`:
'backbone.*' reid-strong-baseline's Baseline, 'nformer.*' the NFormer) loads: `encode` equals
the torch Baseline in eval mode (no stem ReLU, last stride 1, projection, BNNeck "after",
ImageNet normalisation), `refine` the torch NFormer; the embedding method loads the same file
and a bare Baseline."""
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jaxreid
from jaxreid.methods.nformer.model import sample_landmarks
from jaxreid.nn.norms import l2_normalize
from test_nformer_load import DIM, LAYERS, TorchNFormer, reference
from torch_resnet import TorchResNet, calibrate

H, W, CLASSES = 64, 32, 5
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


class Baseline(nn.Module):
  """modeling/baseline.py's Baseline (neck 'bnneck'), on a small ResNet whose stem has no ReLU
  (conv1 → bn1 → maxpool) and whose layer4 has stride 1."""

  def __init__(self):
    super().__init__()
    self.base = TorchResNet(18, False, 8)
    self.base.layer4[0].conv1.stride = (1, 1)                 # last stride 1
    self.base.layer4[0].downsample[0].stride = (1, 1)
    self.projection = nn.Linear(64, DIM)
    self.bottleneck = nn.BatchNorm1d(DIM)
    self.bottleneck.bias.requires_grad_(False)
    nn.init.constant_(self.bottleneck.bias, 0.0)
    self.classifier = nn.Linear(DIM, CLASSES, bias=False)

  def forward(self, x):                                       # eval, neck_feat "after"
    b = self.base
    x = b.maxpool(b.bn1(b.conv1(x)))
    x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
    return self.bottleneck(self.projection(F.adaptive_avg_pool2d(x, 1).flatten(1)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  torch.manual_seed(1)
  baseline = Baseline()
  images = np.random.default_rng(0).integers(0, 256, (4, H, W, 3), dtype=np.uint8)
  x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - MEAN[:, None, None]) \
      / STD[:, None, None]                                     # T.ToTensor + T.Normalize
  calibrate(baseline, x)
  with torch.no_grad():
    baseline.bottleneck.bias.zero_()
    want = baseline(x).numpy()
  torch.manual_seed(0)
  head = TorchNFormer().double().eval()
  state = {**{f"backbone.{k}": v for k, v in baseline.state_dict().items()},
           **{f"nformer.{k}": v.float() for k, v in head.state_dict().items()}}
  d = tmp_path_factory.mktemp("release")
  torch.save(state, d / "nformer_model.pth")
  torch.save(baseline.state_dict(), d / "baseline.pth")
  return d, images, want, head


def test_release_file_encodes_and_refines_like_torch(release):
  d, images, want, head = release
  loaded = jaxreid.load("nformer", d / "nformer_model.pth", input_size=(H, W))
  feats = loaded.encode(images)
  np.testing.assert_allclose(feats, want, atol=2e-4, rtol=1e-3)
  x = np.random.default_rng(2).standard_normal((40, DIM)).astype(np.float32)
  landmarks = np.stack([sample_landmarks(jax.random.fold_in(jax.random.key(0), i), 40, 5)
                        for i in range(LAYERS)])
  np.testing.assert_allclose(loaded.refine(x), reference(head, np.asarray(l2_normalize(x)),
                                                         landmarks, 20), atol=2e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="expected NHWC"):
    loaded.encode(images[:, :32])


@pytest.mark.parametrize("name", ["nformer_model.pth", "baseline.pth"])
def test_embedding_loads_the_stage1_model(release, name):
  d, images, want, _ = release
  model = jaxreid.load("embedding", d / name, input_size=(H, W))
  m = model.config.model
  assert (m.depth, m.last_stride, m.stem_relu, m.embed_dim, m.num_classes) == (18, 1, False, DIM,
                                                                               CLASSES)
  np.testing.assert_allclose(model.encode(images), want, atol=2e-4, rtol=1e-3)
  assert jaxreid.load("embedding", d / name).input_size == (256, 128)   # the official size


def test_bare_baseline_is_not_an_nformer(release):
  d, _, _, _ = release
  with pytest.raises(ValueError, match="stage-1 model only"):
    jaxreid.load("nformer", d / "baseline.pth")
