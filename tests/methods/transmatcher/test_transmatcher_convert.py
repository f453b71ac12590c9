"""Official TransMatcher checkpoints → jaxreid, checked against an independent PyTorch model.

The torch modules follow the official key layout ('base.', 'neck_conv.', 'encoder.layers.{i}.';
criterion 'matcher.decoder.layers.{i}.', 'matcher.decoder.norm.', plus the unused template
'matcher.decoder_layer.') and are written from the papers and docs/methods, not from the Flax code. Scores are
indexed (query, key, key location, query location) as in the official code; the probe is the
query ("kernel") side.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import jaxreid
from jaxreid import weights
from jaxreid.methods.transmatcher import convert as tm_convert
from torch_resnet import TorchResNet, calibrate, nhwc
from official_keys import official_shapes

DEPTH, WIDTH, D_MODEL, FFN, N, ENCODERS = 18, 16, 32, 24, 3, 2
INPUT = (64, 32)
S = 4 * 2


class TorchFeatures(nn.Module):
  """base → neck_conv → N-1 post-LN encoder layers; returns the N decoder inputs [B, N, h, w, d]."""

  def __init__(self):
    super().__init__()
    self.base = TorchResNet(DEPTH, True, WIDTH)
    self.neck_conv = nn.Conv2d(WIDTH * 4, D_MODEL, 3, padding=1)
    layer = nn.TransformerEncoderLayer(D_MODEL, 1, FFN, dropout=0.0, batch_first=True)
    self.encoder = nn.TransformerEncoder(layer, ENCODERS, enable_nested_tensor=False)

  def forward(self, images):
    x = self.neck_conv(self.base(images))                 # [B, d, h, w]
    b, d, h, w = x.shape
    seq = x.flatten(2).transpose(1, 2)                     # [B, hw, d]
    outs = [seq]
    for layer in self.encoder.layers:
      seq = layer(seq)
      outs.append(seq)
    return torch.stack(outs[-N:], 1).reshape(b, N, h, w, d)


class TorchDecoderLayer(nn.Module):
  def __init__(self):
    super().__init__()
    self.score_embed = nn.Parameter(torch.randn(1, 1, S, S))
    self.fc1 = nn.Linear(D_MODEL, D_MODEL)
    self.bn1 = nn.BatchNorm1d(1)
    self.fc2 = nn.Linear(S, FFN)
    self.bn2 = nn.BatchNorm1d(FFN)
    self.fc3 = nn.Linear(FFN, 1)
    self.bn3 = nn.BatchNorm1d(1)

  def forward(self, tgt, memory):  # [q, S, d], [k, S, d]
    q, k = len(tgt), len(memory)
    query, key = self.fc1(tgt), self.fc1(memory)
    score = torch.einsum("qtd,ksd->qkst", query, key) * self.score_embed.sigmoid()
    score = score.reshape(q * k, S, S)
    score = torch.cat((score.max(dim=1)[0], score.max(dim=2)[0]), dim=-1)
    score = self.bn1(score.view(-1, 1, S)).view(-1, S)
    score = self.fc3(torch.relu(self.bn2(self.fc2(score))))
    return self.bn3(score.view(-1, 2).sum(-1, keepdim=True)).view(q, k)


class TorchDecoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.layers = nn.ModuleList([TorchDecoderLayer() for _ in range(N)])
    self.norm = nn.BatchNorm1d(1)

  def forward(self, tgt, memory):
    score = sum(layer(tgt[:, i], memory[:, i]) for i, layer in enumerate(self.layers))
    return self.norm(score.reshape(-1, 1)).view(score.shape)


class TorchTransMatcher(nn.Module):
  def __init__(self):
    super().__init__()
    self.decoder_layer = TorchDecoderLayer()   # the official template copy; never used
    self.decoder = TorchDecoder()

  def forward(self, probe, gallery):  # [B, N, h, w, d]
    flat = lambda x: x.reshape(x.shape[0], N, S, D_MODEL)
    return self.decoder(flat(probe), flat(gallery))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch.manual_seed(0)
  features, matcher = TorchFeatures(), TorchTransMatcher()
  images = torch.rand(6, 3, *INPUT)
  calibrate(features, images)
  with torch.no_grad():
    maps = features(images)
  calibrate(matcher, maps, maps)
  criterion = {f"matcher.{k}": v for k, v in matcher.state_dict().items()}
  path = tmp_path_factory.mktemp("tm") / "checkpoint.pth.tar"
  torch.save({"model": features.state_dict(), "criterion": criterion, "epoch": 3}, path)
  return features, matcher, images, maps, path


def test_official_checkpoint_gives_the_same_maps_and_scores(reference):
  features, matcher, images, maps, path = reference
  model = jaxreid.load("transmatcher", path, input_size=INPUT)
  m = model.config.model
  assert (m.depth, m.ibn, m.neck, m.ffn, m.num_layers, m.encoders) == (18, "b", 32, 24, 3, 2)
  assert m.fc1 and m.bn1 and m.mlp_head1 and m.prior_embed and not m.pos_embed
  ours = model.encode(nhwc(images))
  np.testing.assert_allclose(ours, maps.numpy(), rtol=1e-4, atol=1e-4)
  probe, gallery = slice(0, 4), slice(1, 6)
  with torch.no_grad():
    want = matcher(maps[probe], maps[gallery]).numpy()
  got = model.match(maps.numpy()[probe], maps.numpy()[gallery])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(want - want.mean()).max() > 0.1   # not a degenerate constant


def test_qaconv_loader_rejects_it_and_wrong_input_size(reference):
  path = reference[-1]
  with pytest.raises(ValueError, match="transmatcher"):
    jaxreid.load("qaconv", path)
  with pytest.raises(ValueError, match="decoder reads 8 locations"):
    tm_convert.transmatcher_from_official(weights.read_state_dict(path), (384, 128))


def test_paper_config_matches_the_official_parameter_layout():
  """Full size (ResNet-50-IBN-b, d=512, D=2048, N=3) by shapes only: no compile, no weights."""
  import jax
  from configs import transmatcher as tm_config
  from jaxreid.models import init_variables
  from jaxreid.registry import build_model
  here = Path(__file__).resolve().parents[2] / "data"
  sections = {}
  for name in ("official_qaconv_resnet50_ibn_b_keys.txt", "official_transmatcher_keys.txt"):
    sections.update(official_shapes(here / name))
  config = tm_config.get_config("msmt17")
  model = build_model(config)
  abstract = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), 384, 128))
  maps = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), abstract,
                        jax.ShapeDtypeStruct((2, 384, 128, 3), np.uint8))
  assert maps.shape == (2, 3, 24, 8, 512)

  rng = np.random.default_rng(0)
  fake = lambda shape: rng.standard_normal(shape).astype(np.float32) if shape else np.int64(0)
  model_state = {f"base.{k}": fake(s) for k, s in sections["resnet50_ibn_b"].items()
                 if not k.startswith("fc.")}
  model_state |= {"neck_conv.weight": fake((512, 1024, 3, 3)), "neck_conv.bias": fake((512,))}
  encoder = next(v for k, v in sections.items() if k.startswith("restranmap encoder"))
  for i in range(2):
    model_state |= {f"encoder.layers.{i}.{k}": fake(s) for k, s in encoder.items()}
  matcher = next(v for k, v in sections.items() if k.startswith("TransMatcher"))
  ckpt = {"model": model_state, "epoch": 0,
          "criterion": {f"matcher.{k}": fake(s) for k, s in matcher.items()}}
  overrides, variables = tm_convert.transmatcher_from_official(ckpt)
  m = overrides["model"]
  assert (m["depth"], m["ibn"], m["neck"], m["ffn"], m["num_layers"], m["encoders"]) == (
      50, "b", 512, 2048, 3, 2)
  ours = jax.tree.map(lambda x: x.shape, abstract)
  theirs = jax.tree.map(lambda x: np.shape(x), variables)
  assert ours == theirs
