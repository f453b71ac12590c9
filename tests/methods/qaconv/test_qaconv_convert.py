"""Official QAConv checkpoints → jaxreid, checked against independent PyTorch modules.

The torch modules below follow the official key layout (torchvision ResNet with IBN-Net's IBN-b,
`neck_conv`, the QAConv matcher) and are written from the papers and docs/methods, not from the Flax code.
"""
import types
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from torch import nn

import jaxreid
from jaxreid import weights
from jaxreid.backbones import resnet
from jaxreid.backbones.resnet import ResNet
from jaxreid.methods.qaconv import convert as qaconv_convert
from torch_resnet import TORCH_DEPTHS, TorchBlock, TorchResNet, calibrate, nhwc

ROOT = Path(__file__).resolve().parents[3]
class TorchFeatureModel(nn.Module):
  """Official QAConv feature model: base → 3×3 neck conv (bias) → L2 over channels.

  `neck_bn`: the older official variant, a conv without bias followed by BatchNorm2d.
  """

  def __init__(self, depth, ibn, width, neck, neck_bn=False):
    super().__init__()
    self.base = TorchResNet(depth, ibn, width)
    channels = width * 4 * (4 if TORCH_DEPTHS[depth][0] else 1)
    self.neck_conv = nn.Conv2d(channels, neck, 3, padding=1, bias=not neck_bn)
    self.neck_bn = nn.BatchNorm2d(neck) if neck_bn else nn.Identity()

  def forward(self, x):
    return F.normalize(self.neck_bn(self.neck_conv(self.base(x))), dim=1)


class TorchQAConv(nn.Module):
  """QAConv matcher (docs/methods/qaconv.md): v2.1 shared Linear(hw) per direction, v1 Linear(2hw)."""

  def __init__(self, hw, head):
    super().__init__()
    self.hw, self.head = hw, head
    self.bn = nn.BatchNorm1d(1)
    self.fc = nn.Linear(hw if head == "v2.1" else 2 * hw, 1)
    self.logit_bn = nn.BatchNorm1d(1)

  def forward(self, probe, gallery):  # NCHW, L2-normalised
    num_p, num_g = len(probe), len(gallery)
    s = torch.einsum("pdt,gdr->pgtr", probe.flatten(2), gallery.flatten(2))
    over_probe = s.max(dim=2).values     # [P, G, hw]: one per gallery location
    over_gallery = s.max(dim=3).values   # [P, G, hw]: one per probe location
    if self.head == "v2.1":
      x = torch.stack([over_gallery, over_probe], 2).reshape(-1, 1, self.hw)
      x = self.fc(self.bn(x).reshape(-1, self.hw)).reshape(num_p, num_g, 2).sum(-1)
    else:  # the official v1 order: the half indexed by gallery location first
      x = torch.cat([over_probe, over_gallery], -1).reshape(-1, 1, 2 * self.hw)
      x = self.fc(self.bn(x).reshape(-1, 2 * self.hw)).reshape(num_p, num_g)
    return self.logit_bn(x.reshape(-1, 1)).reshape(num_p, num_g)


class Reference(types.SimpleNamespace):
  """A torch feature model, its images and maps, and a matcher per head."""


def make_reference(depth, ibn, input_size, seed=0, neck_bn=False):
  torch.manual_seed(seed)
  feature_model = TorchFeatureModel(depth, ibn, width=16, neck=32, neck_bn=neck_bn)
  images = torch.rand(6, 3, *input_size)
  calibrate(feature_model, images)
  with torch.no_grad():
    maps = feature_model(images)
  hw = maps.shape[2] * maps.shape[3]
  matchers = {}
  for head in ("v2.1", "v1"):
    matcher = TorchQAConv(hw, head)
    with torch.no_grad():
      matcher.fc.weight.uniform_(0.5 / hw, 1.5 / hw)
    calibrate(matcher, maps, maps)
    matchers[head] = matcher
  return Reference(feature_model=feature_model, images=nhwc(images), maps=maps,
                   matchers=matchers, input_size=input_size, depth=depth, ibn=ibn)


def official_checkpoint(ref, head):
  """The dict the official code saves with torch.save."""
  criterion = {f"matcher.{k}": v for k, v in ref.matchers[head].state_dict().items()}
  return {"model": ref.feature_model.state_dict(), "criterion": criterion, "epoch": 3}


def torch_scores(ref, head, probe, gallery):
  with torch.no_grad():
    return ref.matchers[head](ref.maps[probe], ref.maps[gallery]).numpy()


PROBE, GALLERY = slice(0, 3), slice(2, 6)


@pytest.fixture(scope="module")
def r50_ibn():
  return make_reference(50, True, (64, 32))


@pytest.fixture(scope="module")
def r18():
  return make_reference(18, False, (384, 128), seed=1)


@pytest.fixture(scope="module")
def r18_path(r18, tmp_path_factory):
  path = tmp_path_factory.mktemp("r18") / "checkpoint.pth.tar"
  torch.save(official_checkpoint(r18, "v2.1"), path)
  return path


def check_against_torch(model, ref, head):
  maps = model.encode(ref.images)
  np.testing.assert_allclose(maps, nhwc(ref.maps), atol=1e-4)
  scores = model.match(maps[PROBE], maps[GALLERY])
  assert scores.shape == (3, 4)
  np.testing.assert_allclose(scores, torch_scores(ref, head, PROBE, GALLERY), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head", ["v2.1", "v1"])
def test_r50_ibn_b_official_checkpoint(r50_ibn, head, tmp_path):
  path = tmp_path / "checkpoint.pth.tar"
  torch.save(official_checkpoint(r50_ibn, head), path)
  model = jaxreid.load("qaconv", path, input_size=(64, 32), batch_size=4)  # 6 images: 2 steps
  m = model.config.model
  assert (m.depth, m.ibn, m.width, m.neck, m.final_layer, m.head) == (50, "b", 16, 32, "layer3",
                                                                      head)
  assert model.input_size == (64, 32) and tuple(model.map_size) == (4, 2)
  check_against_torch(model, r50_ibn, head)


@pytest.mark.parametrize("head", ["v2.1", "v1"])
def test_r18_official_checkpoint(r18, r18_path, head, tmp_path):
  path = r18_path
  if head != "v2.1":
    path = tmp_path / "checkpoint.pth"
    torch.save(official_checkpoint(r18, head), path)
  model = jaxreid.load("qaconv", path)
  m = model.config.model
  assert (m.depth, m.ibn, m.head) == (18, "none", head)
  assert model.input_size == (384, 128) and tuple(model.map_size) == (24, 8)
  check_against_torch(model, r18, head)
  uint8 = (r18.images[:2] * 255).round().astype(np.uint8)
  np.testing.assert_allclose(model.encode(uint8), model.encode(uint8.astype(np.float32) / 255),
                             atol=1e-5)


def test_safetensors_and_config_file(r50_ibn, tmp_path):
  state = weights.flatten_state(official_checkpoint(r50_ibn, "v1"))
  arrays = {k: v.numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
  save_file(arrays, str(tmp_path / "qaconv.safetensors"))
  model = jaxreid.load(f"{ROOT / 'configs' / 'qaconv_gs.py'}:synthetic",
                       tmp_path / "qaconv.safetensors", input_size=(64, 32))
  assert model.config.train.loss == "pairwise" and model.config.model.head == "v1"
  check_against_torch(model, r50_ibn, "v1")


def test_r18_ibn_b_with_neck_bn(tmp_path):
  """ResNet-18 IBN-b (IN in basic blocks) and a neck BatchNorm folded into the neck conv."""
  ref = make_reference(18, True, (64, 32), seed=2, neck_bn=True)
  torch.save(official_checkpoint(ref, "v2.1"), tmp_path / "checkpoint.pth.tar")
  config = jaxreid.api.load_config_file(ROOT / "configs" / "qaconv.py")  # a ConfigDict works too
  model = jaxreid.load(config, tmp_path / "checkpoint.pth.tar", input_size=(64, 32))
  assert (model.config.model.depth, model.config.model.ibn) == (18, "b")
  assert model.config.train.loss == "memory" and model.config.model.neck == 32
  assert config.model.neck == 64  # the caller's config is not modified
  check_against_torch(model, ref, "v2.1")


def test_infer_architecture(r50_ibn, r18):
  r50 = r50_ibn.feature_model.state_dict()
  assert resnet.infer_architecture(r50) == dict(depth=50, ibn="b", width=16)
  assert resnet.infer_architecture(r18.feature_model.base.state_dict(), "") == dict(
      depth=18, ibn="none", width=16)
  truncated = {k: v for k, v in r50.items() if not k.startswith("base.layer4")}
  assert resnet.infer_architecture(truncated)["depth"] == 50
  assert resnet.deepest_layer(truncated, "base.") == "layer3"


def test_imagenet_backbone_to_layer4(r18, tmp_path):
  """A bare torchvision-style state dict (with fc) converts for final_layer=layer4."""
  base = r18.feature_model.base
  torch.save(base.state_dict(), tmp_path / "resnet18.pth")
  cfg = ml_collections.ConfigDict(dict(depth=18, ibn="none", width=16, final_layer="layer4"))
  params, batch_stats = resnet.load_pretrained(tmp_path / "resnet18.pth", cfg)
  images = np.random.default_rng(0).random((2, 64, 32, 3), np.float32)
  flax_out = ResNet(depth=18, ibn="none", final_layer="layer4", width=16).apply(
      {"params": params, "batch_stats": batch_stats}, jnp.asarray(images))
  with torch.no_grad():
    torch_out = base(torch.from_numpy(images).permute(0, 3, 1, 2), "layer4")
  np.testing.assert_allclose(flax_out, nhwc(torch_out), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="depth"):
    resnet.load_pretrained(tmp_path / "resnet18.pth",
                                     ml_collections.ConfigDict(dict(cfg.to_dict(), depth=50)))


def test_orbax_checkpoint_roundtrip(r18, r18_path, tmp_path):
  from jaxreid.checkpoint import Checkpointer
  official = jaxreid.load("qaconv", r18_path)
  state = types.SimpleNamespace(step=jnp.asarray(7), params=official.variables["params"],
                                batch_stats=official.variables["batch_stats"])
  checkpointer = Checkpointer(str(tmp_path))
  checkpointer.save_best(state, official.config, {"mAP": 0.5})
  checkpointer.wait()
  checkpointer.close()
  model = jaxreid.load("qaconv_gs", tmp_path)
  assert model.input_size == (384, 128)
  maps = r18.images[:2]
  np.testing.assert_allclose(model.encode(maps), official.encode(maps), atol=1e-6)


def test_orbax_checkpoint_of_another_method(monkeypatch, tmp_path):
  from jaxreid import checkpoint
  saved = ml_collections.ConfigDict({"model": {"name": "transmatcher"}})
  monkeypatch.setattr(checkpoint, "restore_for_eval", lambda path: (saved, {}))
  with pytest.raises(ValueError, match="transmatcher") as raised:   # names both methods
    jaxreid.load("qaconv", tmp_path)
  assert "'qaconv'" in str(raised.value)


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth.tar"):
    jaxreid.load("qaconv", tmp_path / "nope.pth.tar")


def test_transmatcher_checkpoint_given_to_qaconv(r18, tmp_path):
  ckpt = {"model": r18.feature_model.state_dict(),
          "criterion": {"matcher.decoder.layers.0.fc1.weight": torch.zeros(32, 32)}, "epoch": 1}
  torch.save(ckpt, tmp_path / "transmatcher.pth.tar")
  with pytest.raises(ValueError, match="transmatcher"):
    jaxreid.load("qaconv", tmp_path / "transmatcher.pth.tar")
  with pytest.raises(ValueError, match="matcher.fc.weight"):   # the converter alone: no QAConv head
    qaconv_convert.qaconv_from_official(weights.read_state_dict(tmp_path / "transmatcher.pth.tar"))


def test_not_a_qaconv_checkpoint(r18, tmp_path):
  torch.save({"model": r18.feature_model.state_dict()}, tmp_path / "features_only.pth")
  with pytest.raises(ValueError, match="matcher.fc.weight"):
    jaxreid.load("qaconv", tmp_path / "features_only.pth")


def test_wrong_image_size(r18_path):
  model = jaxreid.load("qaconv", r18_path)
  with pytest.raises(ValueError, match="expected images of 384×128, got 64×32; resize to 384×128"):
    model.encode(np.zeros((1, 64, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    model.encode(np.full((1, 384, 128, 3), 255.0, np.float32))


def test_unknown_extension_and_bad_files(tmp_path):
  (tmp_path / "weights.npz").write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown extension"):
    jaxreid.load("qaconv", tmp_path / "weights.npz")
  torch.save([1, 2, 3], tmp_path / "list.pth")
  with pytest.raises(ValueError, match="does not hold a state dict"):
    weights.read_state_dict(tmp_path / "list.pth")
  with pytest.raises(ValueError, match="Unknown method 'nosuch'"):
    jaxreid.load("nosuch", tmp_path / "list.pth")
