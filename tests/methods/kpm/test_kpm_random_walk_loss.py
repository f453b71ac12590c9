"""kpm:released's training (the authors' RandomWalkGrpShufTrainer on RandomWalkKpmNet) against a
PyTorch transcription of the official computation on a tiny batch, and its optimiser groups."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import kpm
from jaxreid import registry
from jaxreid.methods.kpm import objective
from jaxreid.methods.kpm.convert import kpm_to_torch
from jaxreid.methods.kpm.model import KPMMatcher
from jaxreid.train.loop import create_train_state, make_train_step
from jaxreid.train.optim import make_optimizer

P, K, H, W, C, GROUPS, ALPHA = 3, 3, 3, 2, 8, 2, 0.9


def _official_embed(bn, classifier, probe, gallery, p2g):
  """RandomWalkEmbed.forward (temperature 1, no dropout), NCHW maps."""
  if p2g:
    n_p, c, h, w = probe.shape
    n_g = gallery.shape[0]
    x1 = gallery.unsqueeze(0).expand(n_p, n_g, c, h, w).reshape(n_p * n_g, c, h, w)
    x2 = probe.unsqueeze(1).expand(n_p, n_g, c, h, w).reshape(n_p * n_g, c, h, w)
    n = x1.shape[0]
    # kron(x1/‖x1‖, x2/‖x2‖): every position of x1 convolved (1×1) with x2
    w_ = (x1 / x1.norm(2, 1, keepdim=True)).permute(0, 2, 3, 1).reshape(-1, c, 1, 1)
    kro = F.conv2d((x2 / x2.norm(2, 1, keepdim=True)).reshape(1, n * c, h, w), w_, groups=n)
    att = F.softmax(kro.reshape(n * h * w, h * w), dim=1).reshape(n, h * w, h * w)
    warped = torch.bmm(x2.reshape(n, c, h * w), att.transpose(1, 2)).reshape(n, c, h, w)
    diff = F.avg_pool2d(warped - x1, (h, w))
  else:
    n_p = n_g = probe.shape[0]
    pooled = F.avg_pool2d(probe, probe.shape[2:]).reshape(n_p, -1)
    diff = pooled.unsqueeze(0).expand(n_p, n_g, -1) - pooled.unsqueeze(1).expand(n_p, n_g, -1)
  out = classifier(bn(diff.pow(2).reshape(n_p * n_g, -1)))
  return out.reshape(n_p, n_g, -1)


def _official_loss(state, maps_nchw, labels):
  """RandomWalkKpmNet.forward + random_walk_compute + RandomWalkGrpShufTrainer._forward."""
  embeds = []
  for g in range(GROUPS):
    bn, fc = torch.nn.BatchNorm1d(C // GROUPS), torch.nn.Linear(C // GROUPS, 2)
    bn.weight.data = torch.tensor(state[f"embed_{g}.bn.weight"])
    bn.bias.data = torch.tensor(state[f"embed_{g}.bn.bias"])
    fc.weight.data = torch.tensor(state[f"embed_{g}.classifier.weight"])
    fc.bias.data = torch.tensor(state[f"embed_{g}.classifier.bias"])
    embeds.append((bn.train(), fc))
  x = maps_nchw.reshape(P, K, C, H, W)
  probe, gallery = x[:, 0], x[:, 1:].reshape(P * (K - 1), C, H, W)
  count = C // GROUPS
  outputs = []
  for j in range(GROUPS):
    for i in range(GROUPS):
      chunk = slice(i * count, (i + 1) * count)
      p_g = _official_embed(*embeds[j], probe[:, chunk], gallery[:, chunk], True)
      g_g = _official_embed(*embeds[j], gallery[:, chunk], gallery[:, chunk], False)
      n = g_g.shape[0]
      # random_walk_compute: the softmax's implicit dim of a 2-D input is 1
      inf_diag = torch.diag(torch.full((n,), -float("inf"))) + g_g.detach()[:, :, 1]
      a = (1 - ALPHA) * torch.inverse(torch.eye(n) - ALPHA * F.softmax(inf_diag, dim=1))
      a = a.transpose(0, 1)
      p_g = torch.matmul(p_g.permute(2, 0, 1), a).permute(1, 2, 0).reshape(-1, 2)
      g_g = torch.matmul(g_g.permute(2, 0, 1), a).permute(1, 2, 0).reshape(-1, 2)
      outputs.append(torch.cat((p_g, g_g), 0))
  outputs = torch.cat(outputs, 0)
  t = labels.reshape(P, K)
  probe_t, gallery_t = t[:, 0], t[:, 1:].reshape(-1)
  targets = torch.zeros(P * K, P * (K - 1))
  for r in range(P):
    targets[r] = (probe_t[r] == gallery_t).float()
  for r in range(P, P * K):
    targets[r] = (gallery_t[r - P] == gallery_t).float()
  targets = targets.reshape(-1).long().repeat(GROUPS * GROUPS)
  return F.cross_entropy(outputs, targets)


def test_release_loss_matches_the_official_computation():
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(P * K, H, W, C)).astype(np.float32)
  labels = np.asarray([0, 0, 0, 1, 1, 1, 0, 0, 0])          # groups 0 and 2 share an id
  matcher = KPMMatcher(((H, W, C),), variant="released", tau=1.0, groups=GROUPS)
  groups = maps.reshape(P, K, H, W, C)
  probe, gallery = groups[:, 0], groups[:, 1:].reshape(-1, H, W, C)
  variables = matcher.init(jax.random.key(1), probe, gallery)
  # a classifier far from its N(0, 0.001) init, so that the random walk matters
  variables = jax.tree.map(lambda a: a + 0.5 * jnp.cos(jnp.arange(a.size).reshape(a.shape)),
                           variables)

  def loss(params, maps):
    groups = maps.reshape(P, K, H, W, C)
    scores, _ = matcher.apply({**variables, "params": params}, groups[:, 0],
                              groups[:, 1:].reshape(-1, H, W, C), True,
                              method="released_scores", mutable=["batch_stats"])
    return objective.random_walk_loss(scores, jnp.asarray(labels).reshape(P, K), ALPHA)[0]

  value, grad = jax.value_and_grad(loss, argnums=1)(variables["params"], jnp.asarray(maps))
  state = kpm_to_torch({"params": {"encoder": {"backbone": {}}, "matcher": variables["params"]},
                        "batch_stats": {"matcher": variables["batch_stats"]}})
  t_maps = torch.tensor(maps.transpose(0, 3, 1, 2), requires_grad=True)
  expected = _official_loss(state, t_maps, torch.tensor(labels))
  expected.backward()
  np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), t_maps.grad.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-4, atol=1e-6)


def test_random_walk_is_the_closed_form_of_its_iteration():
  """W = (1 − α)(I − αA)⁻¹ is the limit of s ← α A s + (1 − α) s₀ over the gallery."""
  rng = np.random.default_rng(2)
  g2g = rng.normal(size=(5, 5, 2)).astype(np.float32)
  p2g = rng.normal(size=(2, 5, 2)).astype(np.float32)
  same = g2g[..., 1].astype(np.float64) + np.diag(np.full(5, -np.inf))
  a = np.exp(same - same.max(1, keepdims=True))
  a /= a.sum(1, keepdims=True)
  s = p2g.astype(np.float64)
  for _ in range(400):
    s = ALPHA * np.einsum("gk,pkc->pgc", a, s) + (1 - ALPHA) * p2g
  refined, _ = objective.random_walk(jnp.asarray(p2g), jnp.asarray(g2g), ALPHA)
  np.testing.assert_allclose(np.asarray(refined), s, rtol=1e-4, atol=1e-5)


def test_released_train_step_and_optimizer_groups():
  config = kpm.get_config("released")
  assert (config.train.optimizer, config.train.weight_decay, config.train.epochs) == ("adam",
                                                                                    5e-4, 150)
  assert config.train.lr * config.train.backbone_lr_mult == 2e-4       # backbone 2e-4
  assert config.train.lr == 2e-3 and config.train.lr_step_epochs == (40, 80, 120)  # ×10
  assert (config.model.groups, config.model.dropout, config.data.sampler) == (
      2, 0.8, "multi_gallery")
  config.model.update(depth=18, width=8)
  config.data.update(height=64, width=32, batch_size=8)
  model = registry.build_model(config)
  method = registry.method_of(config)
  tx = make_optimizer(config.train, steps_per_epoch=10)
  obj = method.objectives[config.train.loss]
  state = create_train_state(config, model, tx, obj, 2, 8, jax.random.key(0))
  batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 64, 32, 3)),
                                jnp.uint8),
           "label": jnp.asarray([0, 0, 0, 0, 1, 1, 1, 1], jnp.int32),
           "index": jnp.arange(8, dtype=jnp.int32)}
  new, metrics = jax.jit(make_train_step(model, tx, obj, config.train))(state, batch)
  assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1
  # Adam's first step moves every parameter by ≈ its lr: 2e-4 in the backbone, 2e-3 in the embeds
  step = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params, state.params)
  assert 1.5e-4 < step["encoder"]["backbone"]["conv1"]["kernel"] < 2.5e-4
  for g in range(2):
    assert 1.5e-3 < step["matcher"][f"classifier_{g}"]["kernel"] < 2.5e-3
    assert 1.5e-3 < step["matcher"][f"bn_{g}"]["scale"] < 2.5e-3


def test_bad_random_walk_settings_are_one_sentence():
  config = kpm.get_config("released")
  config.train.rw_alpha = 1.0
  with pytest.raises(ValueError, match=r"train.rw_alpha=1.0 must be a finite number in \[0, "):
    registry.build_model(config)
  config = kpm.get_config("released")
  config.model.variant = "paper"
  with pytest.raises(ValueError, match="set model.variant = 'released'"):
    registry.build_model(config)
