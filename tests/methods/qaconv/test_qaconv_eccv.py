"""QAConv's ECCV recipe (`configs/qaconv.py:market`, `:duke`) against the official code at tag
v1.0-eccv: the settings against its command-line defaults, the lr of every epoch against its
StepLR, and v1.0 checkpoints (eval and training forward, loss, gradients, memory update) against
PyTorch transcriptions of its `ResNet` feature model, `QAConvLoss` and evaluation `QAConv`,
written here from docs/methods/qaconv.md."""
import copy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from torch import nn

import jaxreid
from configs import qaconv
from jaxreid import registry, weights
from jaxreid.methods.qaconv import convert as qaconv_convert
from jaxreid.methods.qaconv.objective import CLASS_MEMORY
from jaxreid.models import init_variables
from jaxreid.train.optim import lr_schedule
from torch_resnet import TorchResNet, calibrate, nhwc

# main.py at v1.0-eccv: its argparse defaults, the optimiser and the transforms it builds.
OFFICIAL_V10 = dict(batch_size=32, height=384, width=128, arch=50, final_layer="layer3", neck=128,
                    lr=0.01, epochs=60, step_size=40, max_size=0.8, momentum=0.9,
                    weight_decay=5e-4, nesterov=True, backbone_lr_factor=0.1)


# ------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize("setting,train,test,numbers", [
    ("market", "market1501", "dukemtmc_reid", (48.8, 28.7)),
    ("duke", "dukemtmc_reid", "market1501", (58.6, 27.2))])
def test_eccv_settings_are_the_v10_recipe(setting, train, test, numbers):
  c = qaconv.get_config(setting)
  o = OFFICIAL_V10
  assert (c.dataset.train, c.dataset.test) == (train, test)
  assert {k: (v["R1"], v["mAP"]) for k, v in c.eval.paper.items()} == {test: numbers}
  d, m, t = c.data, c.model, c.train
  assert (d.batch_size, d.height, d.width, d.sampler) == (o["batch_size"], o["height"],
                                                          o["width"], "random")
  # Flip + occlusion only: no pad/crop, rotation, colour jitter or random erasing.
  assert d.augment.to_dict() == dict(pad=0, flip=True, rotate_deg=0.0, color_jitter=False,
                                     occlusion=True, random_erasing=0.0)
  assert d.get("resize", "bicubic") == "bicubic"         # T.Resize(interpolation=3)
  assert (m.depth, m.width, m.ibn, m.freeze_bn, m.final_layer, m.neck, m.neck_bn, m.head,
          m.input_norm) == (o["arch"], 64, "none", False, o["final_layer"], o["neck"], True, "v1",
                            "none")
  assert m.get("stem_relu", True) and m.last_stride == 2
  assert (t.loss, t.focal_gamma, t.memory_mask_invalid) == ("memory", 2.0, False)
  assert (t.optimizer, t.lr, t.backbone_lr_mult, t.momentum, t.nesterov, t.weight_decay) == (
      "sgd", o["lr"], o["backbone_lr_factor"], o["momentum"], o["nesterov"], o["weight_decay"])
  assert (t.epochs, tuple(t.lr_step_epochs), t.lr_step_factor, t.clip_norm, t.bf16) == (
      o["epochs"], (o["step_size"],), 0.1, 0.0, False)
  assert t.get("warmup_epochs", 0) == 0 and t.get("adaptive_step_factor", 0.0) == 0.0


@pytest.mark.parametrize("setting", ["market_hybrid", "duke_hybrid"])
def test_hybrid_settings_carry_no_paper_numbers(setting):
  c = qaconv.get_config(setting)
  assert not c.eval.paper.to_dict()
  assert (c.model.ibn, c.model.head, c.model.freeze_bn, c.model.neck_bn) == ("b", "v2.1", True,
                                                                             False)
  assert c.train.loss == "memory" and c.dataset.test in ("dukemtmc_reid", "market1501")


def test_synthetic_default_keeps_its_recipe():
  c = qaconv.get_config()
  assert (c.model.head, c.model.neck_bn, c.train.memory_mask_invalid, c.train.lr) == (
      "v2.1", False, True, 0.01)
  with pytest.raises(ValueError, match="market_hybrid"):
    qaconv.get_config("msmt")


def _official_step_lr(epochs, lr, step_size):
  """lr of each epoch's param groups (base, new, criterion) in main.py at v1.0-eccv: training
  epoch e, then `lr_scheduler.step(epoch + 1)`, i.e. StepLR's closed form at last_epoch = e."""
  lrs = []
  for epoch in range(epochs):
    factor = 0.1 ** (epoch // step_size)
    lrs.append((0.1 * lr * factor, lr * factor, lr * factor))
  return lrs


def test_lr_of_every_epoch_is_the_official_step_lr():
  c = qaconv.get_config("market")
  steps = 404                                             # 12936 Market images // 32
  schedule = lr_schedule(c.train, steps)
  ours = []
  for e in range(c.train.epochs):
    first, last = float(schedule(e * steps)), float(schedule(e * steps + steps - 1))
    assert first == pytest.approx(last)
    ours.append((first * c.train.backbone_lr_mult, first, first))
  official = _official_step_lr(OFFICIAL_V10["epochs"], OFFICIAL_V10["lr"],
                               OFFICIAL_V10["step_size"])
  np.testing.assert_allclose(ours, official, rtol=1e-6)


def test_full_size_eccv_model_by_shapes():
  """The full-size ECCV model and its class memory by shapes (jax.eval_shape: no compile), and
  a v1.0 checkpoint of full-size shapes fills every one of its variables."""
  config = qaconv.get_config("market")
  model = registry.build_model(config)
  abstract = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), 384, 128))
  enc = abstract["params"]["encoder"]
  assert enc["neck_conv"]["kernel"].shape == (3, 3, 1024, 128) and "bias" not in enc["neck_conv"]
  assert enc["neck_bn"]["scale"].shape == (128,)
  assert abstract["batch_stats"]["encoder"]["neck_bn"]["var"].shape == (128,)
  assert abstract["params"]["matcher"]["fc"]["kernel"].shape == (2 * 24 * 8, 1)
  assert "IN" not in str(jax.tree_util.tree_structure(enc["backbone"]))
  memory = jax.eval_shape(lambda: CLASS_MEMORY.init_memory(config, None, 751, 12936, None))
  assert memory["features"].shape == (751, 24, 8, 128)
  batch = {"image": jax.ShapeDtypeStruct((32, 384, 128, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((32,), jnp.int32)}
  loss, (stats, maps, metrics) = jax.eval_shape(
      lambda v, mem, b: CLASS_MEMORY.loss(model, v, types.SimpleNamespace(memory=mem), b,
                                          config.train), abstract, memory, batch)
  assert loss.shape == () and maps.shape == (32, 24, 8, 128)
  assert jax.tree.map(lambda x: x.shape, stats) == jax.tree.map(lambda x: x.shape,
                                                                abstract["batch_stats"])

  torch_model = V10ResMap(50, width=64, neck=128)   # torchvision ResNet-50, all four layers + fc
  criterion = {"class_memory": np.zeros((1, 128, 24, 8), np.float32),
               "fc.weight": np.zeros((1, 384), np.float32), "fc.bias": np.zeros(1, np.float32)}
  for bn in ("bn", "logit_bn"):
    criterion.update({f"{bn}.{k}": np.ones(1, np.float32)
                      for k in ("weight", "bias", "running_mean", "running_var")})
  ckpt = {"model": {k: v.numpy() for k, v in torch_model.state_dict().items()},
          "criterion": criterion, "epoch": 60}
  overrides, variables = qaconv_convert.qaconv_from_official(ckpt)
  assert {k: overrides["model"][k] for k in ("depth", "ibn", "neck", "neck_bn", "head")} == dict(
      depth=50, ibn="none", neck=128, neck_bn=True, head="v1")
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(np.shape, variables)


# ------------------------------------------------------------------------------------------------
# PyTorch transcriptions of v1.0-eccv


class V10ResMap(nn.Module):
  """v1.0's feature model: torchvision ResNet `base` (run up to final_layer), 3×3 `neck_conv`
  without bias, `neck_bn` BatchNorm2d, L2 over channels."""

  def __init__(self, depth, width, neck, final_layer="layer3"):
    super().__init__()
    self.final_layer = final_layer
    self.base = TorchResNet(depth, False, width)
    channels = {"layer2": 2, "layer3": 4, "layer4": 8}[final_layer] * width * 4
    self.neck_conv = nn.Conv2d(channels, neck, kernel_size=3, padding=1, bias=False)
    self.neck_bn = nn.BatchNorm2d(neck)

  def forward(self, x):
    return F.normalize(self.neck_bn(self.neck_conv(self.base(x, self.final_layer))))


def _pool_v10(gallery_side, kernel_side, num_kernels, hw):
  """conv2d of `gallery_side` [n, d, h, w] with every location of `kernel_side` as a 1×1 kernel,
  then v1.0's [max over kernel locations, max over gallery locations] → [n, k, 2hw]."""
  d = kernel_side.shape[1]
  kernel = kernel_side.permute(0, 2, 3, 1).reshape(-1, d, 1, 1)
  s = F.conv2d(gallery_side, kernel).view(len(gallery_side), num_kernels, hw, hw)
  return torch.cat((s.max(dim=2)[0], s.max(dim=3)[0]), dim=-1)


class V10QAConvLoss(nn.Module):
  """v1.0's QAConvLoss: class memory, scalar BN over the [C, B, 2hw] scores, Linear(2hw),
  scalar logit BN, focal BCE (γ = 2) summed over all C classes; memory[target] = feature."""

  def __init__(self, num_classes, num_features, height, width):
    super().__init__()
    self.hw = height * width
    self.register_buffer("class_memory", torch.zeros(num_classes, num_features, height, width))
    self.bn = nn.BatchNorm1d(1)
    self.fc = nn.Linear(2 * self.hw, 1)
    self.logit_bn = nn.BatchNorm1d(1)

  def forward(self, feature, target):
    c, b = len(self.class_memory), len(target)
    score = _pool_v10(self.class_memory.detach().clone(), feature, b, self.hw)   # [C, B, 2hw]
    score = self.bn(score.view(c, 1, b * 2 * self.hw)).view(c * b, 2 * self.hw)
    score = self.fc(score).view(c, b).t()
    score = self.logit_bn(score.unsqueeze(1)).squeeze()
    onehot = torch.zeros_like(score).scatter(1, target.unsqueeze(1), 1)
    loss = F.binary_cross_entropy_with_logits(score, onehot, reduction="none")
    prob = score.sigmoid()
    loss = (loss * torch.pow(torch.where(onehot.bool(), 1. - prob, prob), 2.)).sum(-1)
    with torch.no_grad():
      acc = (score.argmax(1) == target).float()
      self.class_memory[target] = feature
    return loss, acc


def v10_eval_scores(criterion, probe, gallery):
  """v1.0's evaluation QAConv with the learned layers of `criterion` (eval mode): the probe
  maps are the kernels; returns the pre-sigmoid scores [G, P] (the evaluator then takes
  sigmoid(s / 10))."""
  g, p, hw = len(gallery), len(probe), criterion.hw
  score = _pool_v10(gallery, probe, p, hw)                                    # [G, P, 2hw]
  score = criterion.bn(score.view(-1, 1, p * 2 * hw)).view(-1, 2 * hw)
  score = criterion.fc(score).view(g, p)
  return criterion.logit_bn(score.unsqueeze(1)).view(g, p)


NUM_CLASSES = 5


@pytest.fixture(scope="module")
def v10():
  """A small v1.0 model (ResNet-50 layout, width 16, neck 32, 64×32 input → 4×2 maps), its
  criterion with a class memory of which two rows are still unfilled (zero), and the
  checkpoint main.py would save (state before any further training)."""
  torch.manual_seed(3)
  feature_model = V10ResMap(50, width=16, neck=32)
  images = torch.rand(6, 3, 64, 32)
  calibrate(feature_model, images)
  criterion = V10QAConvLoss(NUM_CLASSES, 32, 4, 2)
  with torch.no_grad():
    maps = feature_model(images)
    criterion.fc.weight.uniform_(-0.3, 0.5)
    criterion.class_memory.copy_(maps[:NUM_CLASSES])
    criterion.class_memory[[1, 3]] = 0                 # classes not seen yet
  calibrate(criterion, maps[:4], torch.arange(4))   # BN stats of one training forward, perturbed
  for bn in (*feature_model.modules(), criterion.bn, criterion.logit_bn):
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
      bn.momentum = 0.1                               # calibrate set 1.0; torch's default again
  with torch.no_grad():
    criterion.class_memory.copy_(maps[:NUM_CLASSES])
    criterion.class_memory[[1, 3]] = 0
  ckpt = {"model": {k: v.clone() for k, v in feature_model.state_dict().items()},
          "criterion": {k: v.clone() for k, v in criterion.state_dict().items()},
          "optim": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0, 1]}]},
          "epoch": 60}
  return types.SimpleNamespace(feature_model=feature_model, criterion=criterion, images=images,
                               maps=maps, ckpt=ckpt)


@pytest.fixture(scope="module")
def v10_path(v10, tmp_path_factory):
  path = tmp_path_factory.mktemp("v10") / "checkpoint.pth.tar"
  torch.save(v10.ckpt, path)
  return path


# ------------------------------------------------------------------------------------------------
# v1.0 checkpoints


def _check_eval(model, v10):
  maps = model.encode(nhwc(v10.images))
  np.testing.assert_allclose(maps, nhwc(v10.maps), atol=1e-5)
  probe, gallery = slice(0, 2), slice(1, 6)
  with torch.no_grad():
    official = v10_eval_scores(v10.criterion, v10.maps[probe], v10.maps[gallery]).numpy()  # [G, P]
  ours = np.asarray(model.match(maps[probe], maps[gallery]))                          # [P, G]
  np.testing.assert_allclose(ours, official.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jax.nn.sigmoid(ours / 10), 1 / (1 + np.exp(-official.T / 10)),
                             atol=1e-6)


def test_v10_checkpoint_loads_and_matches_the_official_eval(v10, v10_path):
  assert registry.detect(weights.read_state_dict(v10_path)) == "qaconv"
  model = jaxreid.load("qaconv", v10_path, input_size=(64, 32))
  m = model.config.model
  assert (m.depth, m.ibn, m.width, m.final_layer, m.neck, m.neck_bn, m.head) == (
      50, "none", 16, "layer3", 32, True, "v1")
  assert model.map_size == (4, 2)
  assert "bias" not in model.variables["params"]["encoder"]["neck_conv"]
  _check_eval(model, v10)


def test_v10_checkpoint_flattened_to_safetensors(v10, tmp_path):
  flat = weights.flatten_state({k: v for k, v in v10.ckpt.items() if k in ("model", "criterion")})
  save_file({k: v.numpy() for k, v in flat.items()}, str(tmp_path / "v10.safetensors"))
  assert "criterion.fc.weight" in flat and not any(k.startswith("criterion.matcher.") for k in flat)
  _check_eval(jaxreid.load("qaconv", tmp_path / "v10.safetensors", input_size=(64, 32)), v10)


def test_v10_export_round_trip_keeps_the_neck_bn(v10, v10_path):
  model = jaxreid.load("qaconv", v10_path, input_size=(64, 32))
  state = registry.get("qaconv").export(model.variables)
  assert "neck_bn.running_var" in state["model"] and "neck_conv.bias" not in state["model"]
  overrides, variables = registry.get("qaconv").convert(state, (64, 32))
  assert overrides["model"]["neck_bn"] is True
  jax.tree.map(np.testing.assert_array_equal, variables, jax.tree.map(np.asarray,
                                                                        model.variables))


def test_neck_conv_bias_before_a_neck_bn_moves_into_its_mean(v10, tmp_path):
  """A conv bias followed by BN is the BN with running mean μ − b (eval) and cancels in
  training: the converted model has no bias and the torch outputs."""
  ckpt = {"model": dict(v10.ckpt["model"]), "criterion": v10.ckpt["criterion"]}
  bias = torch.linspace(-0.2, 0.3, 32)
  ckpt["model"]["neck_conv.bias"] = bias
  torch.save(ckpt, tmp_path / "bias.pth")
  model = jaxreid.load("qaconv", tmp_path / "bias.pth", input_size=(64, 32))
  assert "bias" not in model.variables["params"]["encoder"]["neck_conv"]
  np.testing.assert_allclose(model.variables["batch_stats"]["encoder"]["neck_bn"]["mean"],
                             (v10.ckpt["model"]["neck_bn.running_mean"] - bias).numpy(), atol=1e-6)
  f = v10.feature_model
  with torch.no_grad():
    want = F.normalize(f.neck_bn(f.neck_conv(f.base(v10.images)) + bias[:, None, None]))
  np.testing.assert_allclose(model.encode(nhwc(v10.images)), nhwc(want), atol=1e-5)


def test_v10_training_forward_loss_gradients_and_memory(v10, v10_path):
  """One training forward of the ECCV setting on a loaded v1.0 checkpoint equals v1.0's (BN
  trained everywhere, the whole-matrix matcher BN, the unmasked focal sum, the memory write):
  maps, loss, matcher BN statistics, gradients and the new memory."""
  model = jaxreid.load(f"{qaconv.__file__}:market", v10_path, input_size=(64, 32))
  cfg = model.config.train
  assert cfg.memory_mask_invalid is False and model.config.model.freeze_bn is False
  images, labels = v10.images[:4], torch.tensor([2, 0, 4, 1])   # class 1's memory is unfilled
  memory = {"features": jnp.asarray(nhwc(v10.criterion.class_memory)),
            "valid": jnp.asarray(v10.criterion.class_memory.flatten(1).abs().sum(1).numpy() > 0)}
  assert memory["valid"].tolist() == [True, False, True, False, True]
  batch = {"image": jnp.asarray(nhwc(images)), "label": jnp.asarray(labels.numpy())}
  state = types.SimpleNamespace(memory=memory)

  def loss_fn(params, train_cfg):
    variables = {"params": params, "batch_stats": model.variables["batch_stats"]}
    return CLASS_MEMORY.loss(model.module, variables, state, batch, train_cfg)

  (loss, (stats, maps, metrics)), grads = jax.jit(jax.value_and_grad(
      lambda p: loss_fn(p, cfg), has_aux=True))(model.variables["params"])

  feature_model, criterion = copy.deepcopy(v10.feature_model), copy.deepcopy(v10.criterion)
  feature_model.train(), criterion.train()
  feature = feature_model(images)
  torch_loss, acc = criterion(feature, labels)
  torch_loss.mean().backward()
  np.testing.assert_allclose(maps, nhwc(feature), atol=1e-4)   # batch-statistics BN: rounding
  np.testing.assert_allclose(float(loss), float(torch_loss.mean().detach()), rtol=1e-4)
  assert float(metrics["accuracy"]) == pytest.approx(float(acc.mean()))
  for name in ("bn", "logit_bn"):
    torch_bn = getattr(criterion, name)
    np.testing.assert_allclose(stats["matcher"][name]["mean"], torch_bn.running_mean.numpy(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["matcher"][name]["var"], torch_bn.running_var.numpy(),
                               rtol=1e-4)
  np.testing.assert_allclose(stats["encoder"]["neck_bn"]["mean"],
                             feature_model.neck_bn.running_mean.numpy(), atol=1e-5)
  # (The first matcher BN's γ, β have a zero gradient up to rounding: the logit BN undoes them.)
  def close(ours, theirs):   # float32 rounding, relative to the gradient's scale
    theirs = theirs.detach().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-3, atol=2e-3 * np.abs(theirs).max())

  close(grads["matcher"]["fc"]["kernel"][:, 0], criterion.fc.weight.grad[0])
  close(grads["matcher"]["logit_bn"]["scale"], criterion.logit_bn.weight.grad)
  close(grads["matcher"]["logit_bn"]["bias"], criterion.logit_bn.bias.grad)
  close(grads["encoder"]["neck_bn"]["scale"], feature_model.neck_bn.weight.grad)
  close(grads["encoder"]["neck_conv"]["kernel"],
        feature_model.neck_conv.weight.grad.permute(2, 3, 1, 0))
  close(grads["encoder"]["backbone"]["layer3_5"]["bn3"]["scale"],
        feature_model.base.layer3[5].bn3.weight.grad)
  new_memory = CLASS_MEMORY.update_memory(memory, maps, batch, cfg)
  np.testing.assert_allclose(new_memory["features"], nhwc(criterion.class_memory), atol=1e-4)
  assert new_memory["valid"].tolist() == [True, True, True, False, True]

  # The masked sum of later official versions (our default) is another loss here.
  masked_cfg = cfg.copy_and_resolve_references()
  masked_cfg.memory_mask_invalid = True
  masked, _ = jax.jit(lambda p: loss_fn(p, masked_cfg))(model.variables["params"])
  assert float(masked) < float(loss) - 1e-3


def test_tiny_eccv_recipe_trains(tmp_path):
  """The ECCV setting shrunk (ResNet-18 width 8, 64×32): repeated steps on one batch lower the
  loss; the backbone and neck BN statistics move (BN trained); parameters stay float32."""
  from jaxreid.train.loop import create_train_state, make_train_step
  from jaxreid.train.optim import make_optimizer
  config = qaconv.get_config("market")
  config.model.update(depth=18, width=8, neck=16)
  config.data.update(height=64, width=32, batch_size=8)
  model = registry.build_model(config)
  tx = make_optimizer(config.train, steps_per_epoch=10)
  state = create_train_state(config, model, tx, CLASS_MEMORY, num_classes=6, num_images=12,
                             rng=jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 64, 32, 3)), jnp.uint8),
           "label": jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3], jnp.int32)}
  step = jax.jit(make_train_step(model, tx, CLASS_MEMORY, config.train))
  start_stats = state.batch_stats
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[1], losses
  assert state.memory["valid"].tolist() == [True] * 4 + [False] * 2
  moved = lambda a, b: not np.allclose(a, b)
  assert moved(state.batch_stats["encoder"]["neck_bn"]["mean"],
               start_stats["encoder"]["neck_bn"]["mean"])
  assert moved(state.batch_stats["encoder"]["backbone"]["bn1"]["mean"],
               start_stats["encoder"]["backbone"]["bn1"]["mean"])
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
