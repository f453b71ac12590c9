"""The authors' released KPM layout (YantaoShen/kpm_rw_person_reid: `RandomWalkKpmNet`'s
state_dict, 'base.module.base.*' + 'embed_{g}.bn/classifier.*'): a small PyTorch model built in
that layout here, saved, loaded with `jaxreid.load("kpm", path)`, gives the PyTorch scores."""
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jaxreid
from jaxreid import registry
from jaxreid.methods.kpm.convert import detect, kpm_from_torch
from torch_resnet import TorchResNet, calibrate

H, W = 64, 32
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


class Embed(nn.Module):
  """RandomWalkEmbed (reid/models/embedding.py), p2g, eval mode: the probe warped onto the
  gallery (softmax over probe positions of the normalised dot products), averaged difference,
  square, BatchNorm1d, dropout, Linear → 2 classes."""

  def __init__(self, feat_num):
    super().__init__()
    self.bn = nn.BatchNorm1d(feat_num)
    self.classifier = nn.Linear(feat_num, 2)
    self.drop = nn.Dropout(0.5)

  def forward(self, probe_x, gallery_x):
    n_p, c, h, w = probe_x.shape
    n_g = gallery_x.shape[0]
    probe_x = probe_x.unsqueeze(1).expand(n_p, n_g, c, h, w).reshape(-1, c, h, w)
    gallery_x = gallery_x.unsqueeze(0).expand(n_p, n_g, c, h, w).reshape(-1, c, h, w)
    x1, x2 = gallery_x, probe_x
    n = x1.shape[0]
    wgt = (x1 / x1.norm(2, 1, keepdim=True)).permute(0, 2, 3, 1).reshape(-1, c, 1, 1)
    kro = F.conv2d((x2 / x2.norm(2, 1, keepdim=True)).reshape(1, n * c, h, w), wgt, groups=n)
    att = F.softmax(kro.reshape(n * h * w, h * w), dim=1).reshape(n, h * w, h * w)
    warped = torch.bmm(x2.reshape(n, c, h * w), att.transpose(1, 2)).reshape(n, c, h, w)
    diff = F.avg_pool2d(warped - gallery_x, (h, w)).reshape(n, c) ** 2
    return self.classifier(self.drop(self.bn(diff))).reshape(n_p, n_g, 2)


class Wrap(nn.Module):
  def __init__(self, **children):
    super().__init__()
    for name, child in children.items():
      setattr(self, name, child)


def authors_model(groups=2, seed=0):
  """RandomWalkKpmNet's module tree: base = DataParallel(ResNet wrapper).module.base, and
  embed_{g} attributes."""
  torch.manual_seed(seed)
  resnet = TorchResNet(18, False, 8)
  net = Wrap(base=Wrap(module=Wrap(base=resnet)))
  feat = 64 // groups
  for g in range(groups):
    embed = Embed(feat)
    with torch.no_grad():
      embed.bn.weight.uniform_(0.5, 1.5)
      embed.bn.bias.normal_(0, 0.2)
      embed.bn.running_mean.uniform_(0.0, 0.5)
      embed.bn.running_var.uniform_(0.5, 2.0)
      embed.classifier.weight.normal_(0, 0.5)
    setattr(net, f"embed_{g}", embed)
  calibrate(resnet, torch.randn(8, 3, H, W))
  return net.eval(), resnet


def torch_scores(net, resnet, groups, probe, gallery):
  """evaluators.compute_random_walk without the random walk: the mean over embeds h and
  channel chunks j of the (same − different) logits."""
  prep = lambda im: (torch.from_numpy(im).float() / 255 - MEAN) / STD
  with torch.no_grad():
    fp = resnet(prep(probe).permute(0, 3, 1, 2), "layer4")
    fg = resnet(prep(gallery).permute(0, 3, 1, 2), "layer4")
    count = fp.shape[1] // groups
    out = [getattr(net, f"embed_{h}")(fp[:, j * count:(j + 1) * count],
                                      fg[:, j * count:(j + 1) * count])
           for h in range(groups) for j in range(groups)]
    out = torch.stack(out).mean(0)
  return (out[..., 1] - out[..., 0]).numpy()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  groups = 2
  net, resnet = authors_model(groups)
  state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
  path = tmp_path_factory.mktemp("kpm") / "model_best.pth.tar"
  torch.save({"state_dict": state, "epoch": 3, "best_top1": 0.5}, path)
  rng = np.random.default_rng(0)
  probe = rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8)
  gallery = rng.integers(0, 256, (3, H, W, 3), dtype=np.uint8)
  return path, state, torch_scores(net, resnet, groups, probe, gallery), probe, gallery


def test_authors_checkpoint_loads_and_scores_as_pytorch(released):
  path, state, want, probe, gallery = released
  assert registry.detect({"state_dict": state}) == "kpm"
  model = jaxreid.load("kpm", path, input_size=(H, W))
  m = model.config.model
  assert (m.variant, m.scales, m.groups, m.tau, m.depth, m.width, m.ibn) == (
      "released", 1, 2, 1.0, 18, 8, "none")
  np.testing.assert_allclose(model.score(probe, gallery), want, rtol=1e-4, atol=1e-4)


def test_the_pretrained_embed_names_load_too(released):
  path, state, want, probe, gallery = released
  renamed = {k.replace("embed_0.bn.", "embed_model.bn_0.")
              .replace("embed_1.bn.", "embed_model.bn_1.")
              .replace("embed_0.classifier.", "embed_model.classifier_0.")
              .replace("embed_1.classifier.", "embed_model.classifier_1."): v.numpy()
             for k, v in state.items()}
  overrides, variables = kpm_from_torch(renamed, (H, W))
  _, direct = kpm_from_torch({k: v.numpy() for k, v in state.items()}, (H, W))
  jax.tree.map(np.testing.assert_array_equal, variables, direct)
  assert overrides["model"]["groups"] == 2


def test_not_a_kpm_checkpoint_gets_one_clear_error(released):
  _, state, *_ = released
  base_only = {k: v.numpy() for k, v in state.items() if k.startswith("base.")}
  assert not detect(list(base_only))
  with pytest.raises(ValueError, match="no KPM embed"):
    kpm_from_torch(base_only, (H, W))
  extra = {**{k: v.numpy() for k, v in state.items()}, "embed_0.extra.weight": np.zeros(3)}
  with pytest.raises(ValueError, match="keys KPM does not use"):
    kpm_from_torch(extra, (H, W))
