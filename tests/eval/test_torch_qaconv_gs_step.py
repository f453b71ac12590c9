"""bench/torch_qaconv_gs_step.py, the PyTorch transcription of the official QAConv-GS v2.1
training step: its feature model has jaxreid's architecture block for block, its triplet loss
equals a NumPy computation of the official batch-hard mining, and its steps train."""
import sys

import jax
import numpy as np
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import torch_qaconv_gs_step as tq  # noqa: E402

TINY = dict(depth=18, width=8, neck=16, height=64, width_px=32, batch=8)


def jaxreid_encoder_params():
  from configs import qaconv_gs
  from jaxreid import registry
  from jaxreid.models import init_variables
  config = qaconv_gs.get_config()
  config.model.update(depth=18, width=8, neck=16)
  config.model.pretrained = ""
  model = registry.build_model(config)
  variables = init_variables(model, jax.random.key(0), 64, 32)
  maps = model.apply(variables, np.zeros((2, 64, 32, 3), np.uint8), method="encode")
  return config, variables["params"]["encoder"], maps.shape


def size(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_feature_model_matches_jaxreid_block_for_block():
  from jaxreid.backbones.resnet import stage_channels
  config, params, map_shape = jaxreid_encoder_params()
  model = tq.FeatureMap(depth=18, ibn=config.model.ibn, final_layer=config.model.final_layer,
                        neck=16, width=8)
  ours = {}
  for name, p in model.named_parameters():
    parts = name.split(".")
    key = parts[1] if parts[0] == "base" and not parts[1].startswith("layer") else (
        f"{parts[1]}_{parts[2]}" if parts[0] == "base" else parts[0])
    ours[key] = ours.get(key, 0) + p.numel()
  theirs = {k: size(v) for k, v in params["backbone"].items()}
  theirs["neck_conv"] = size(params["neck_conv"])
  assert ours == theirs
  assert sum(p.numel() for p in model.parameters()) == size(params)
  in_blocks = {f"layer{n[1][-1]}_{n[2]}" for n in
               (name.split(".") for name, _ in model.named_parameters()) if "IN" in n}
  assert in_blocks == {k for k, v in params["backbone"].items() if "IN" in v}
  assert in_blocks == {"layer1_1", "layer2_1"}
  assert isinstance(model.base.bn1, torch.nn.InstanceNorm2d)
  x = torch.zeros(2, 3, 64, 32)
  stages = [model.base(x, f"layer{i}").shape[1] for i in (1, 2, 3)]
  assert stages == stage_channels(18, 8)[:3]
  out = model(x)
  assert tuple(out.shape) == (map_shape[0], map_shape[3], map_shape[1], map_shape[2])


def numpy_scores(f, m):
  """QAConv v2.1 scores of every pair of maps f [B, C, h, w], the scalar BNs on batch
  statistics (biased variance, eps 1e-5)."""
  b, c = f.shape[:2]
  x = f.reshape(b, c, -1)
  corr = np.einsum("pcs,gcr->pgrs", x, x)                 # [P, G, gallery loc, probe loc]
  pooled = np.stack([corr.max(2), corr.max(3)], axis=2)   # [P, G, 2, hw]
  bn = lambda v, w, bias: (v - v.mean()) / np.sqrt(v.var() + 1e-5) * w + bias
  pooled = bn(pooled, m["bn.weight"], m["bn.bias"])
  logits = (pooled @ m["fc.weight"][0] + m["fc.bias"][0]).sum(-1)
  return bn(logits, m["logit_bn.weight"], m["logit_bn.bias"])


def hardest(scores, labels):
  """(lowest positive score, the anchor itself excluded; highest negative score) per anchor."""
  same = labels[:, None] == labels[None, :]
  pos = same & ~np.eye(len(labels), dtype=bool)
  return np.where(pos, scores, np.inf).min(1), np.where(same, -np.inf, scores).max(1)


def numpy_triplet(scores, labels, margin):
  """Per-anchor max(0, margin - (hardest positive - hardest negative))."""
  min_pos, max_neg = hardest(scores, labels)
  return np.maximum(0.0, margin - (min_pos - max_neg))


def randomize(matcher, rng):
  with torch.no_grad():
    for p in matcher.parameters():
      p.copy_(torch.from_numpy(rng.normal(0.5, 0.3, p.shape).astype(np.float32)))


def test_triplet_loss_equals_numpy_reference():
  rng = np.random.default_rng(1)
  labels = np.array([0, 1, 0, 2, 1, 2, 2, 3, 3, 4])      # class 4 alone: no positive, loss 0
  protos = rng.normal(size=(5, 6, 3, 2))
  f = (protos[labels] + rng.normal(size=(10, 6, 3, 2))).astype(np.float32)
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  matcher = tq.QAConv(6, 3, 2)
  randomize(matcher, rng)
  with torch.no_grad():
    matcher.logit_bn.weight.neg_()     # self-pairs score lowest: excluding them matters
  margin = 0.2
  criterion = tq.TripletLoss(matcher, margin=margin).train()
  loss, acc = criterion(torch.from_numpy(f), torch.from_numpy(labels))
  m = {k: v.numpy().astype(np.float64) for k, v in matcher.state_dict().items()}
  scores = numpy_scores(f.astype(np.float64), m)
  want = numpy_triplet(scores, labels, margin)
  assert (want == 0).any() and (want > 0.05).any()      # both sides of the hinge
  np.testing.assert_allclose(loss.detach().numpy(), want, rtol=1e-4, atol=1e-5)
  min_pos, max_neg = hardest(scores, labels)
  assert acc.numpy().tolist() == (min_pos >= max_neg).tolist()
  assert 0 < acc.sum() < len(acc)


def test_step_loss_is_the_mean_anchor_loss():
  trainer = tq.build(**TINY, device="cpu", amp=False)
  rng = np.random.default_rng(2)
  randomize(trainer.matcher, rng)
  images, labels = tq.random_batch(8, 64, 32, seed=3)
  with torch.no_grad():
    f = trainer.model.eval()(trainer.to_input(images)).numpy().astype(np.float64)
  m = {k: v.numpy().astype(np.float64) for k, v in trainer.matcher.state_dict().items()}
  want = numpy_triplet(numpy_scores(f, m), labels, tq.MARGIN).mean()
  assert abs(trainer.step(images, labels) - want) < 1e-4 * want
  assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.1 * tq.LR, tq.LR, tq.LR]
  assert trainer.clip_value == 8.0


def test_steps_reduce_the_loss():
  trainer = tq.build(**TINY, device="cpu", amp=False, lr=0.05)
  images, labels = tq.random_batch(8, 64, 32)
  losses = [trainer.step(images, labels) for _ in range(15)]
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.8 * losses[0], losses


def test_measure_reports_positive_rates():
  out = tq.measure(**TINY, device="cpu", amp=False, steps=1)
  assert set(out) == {"images_per_s", "first_s", "wall_s", "step_ms", "loss"}
  assert all(np.isfinite(v) and v > 0 for v in out.values())
