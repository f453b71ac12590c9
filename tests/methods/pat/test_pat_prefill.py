"""PAT's official pre-fill of the part memory bank and its per-batch random test masks.

The pre-fill's bank equals a NumPy forward of the part tokens (tiny ViT, train mode, the batch's
part regions) stored with the bank's rule; training starts from that bank and a resumed run does
not fill it again. With `model.random_test_masks`, each test batch draws its own part regions
(one for the whole batch), reproducibly; without it they are the full bands."""
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from scipy.special import erf

from configs import pat
from jaxreid import registry
from jaxreid.data import datasets, pipeline
from jaxreid.data.samplers import make_sampler
from jaxreid.methods.pat import model as pat_model
from jaxreid.methods.pat import prefill
from jaxreid.models import init_variables
from test_pat import rule_mask


def tiny_config(data_dir=None, **model):
  c = pat.get_config()
  c.model.update({**dict(vit_dim=16, vit_depth=2, vit_heads=2, drop_path=0.0,
                         freeze_patch_embed=True, num_classes=5), **model})
  if data_dir is not None:
    c.dataset.data_dir = data_dir
  c.data.num_threads = 1
  return c


def perturbed(variables, seed=0):
  """The variables plus noise, so that no token is a copy of another (part tokens start as
  copies of the class token)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(a) + 0.2 * rng.normal(size=a.shape).astype(np.float32),
                      variables)


def layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def numpy_tokens(variables, images, mask, c):
  """The PAT ViT in float64 NumPy: [B, 4 + h·w, D] after the final LayerNorm, every block's
  attention restricted to `mask` [N, N] (masked logits −1000, softmax, weights × mask)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"]["encoder"]["backbone"])
  stats = jax.tree.map(lambda a: np.asarray(a, np.float64),
                       variables["batch_stats"]["encoder"]["backbone"])
  m = c.model
  x = (np.asarray(images, np.float64) / 255 - 0.5) / 0.5
  size, stride, d, heads = m.patch_size, m.stride_size, m.vit_dim, m.vit_heads
  kernel, bias = stats["patch_embed_kernel"], stats["patch_embed_bias"]
  gh, gw = (x.shape[1] - size) // stride + 1, (x.shape[2] - size) // stride + 1
  patches = np.zeros((x.shape[0], gh * gw, d))
  for i in range(gh):
    for j in range(gw):
      window = x[:, i * stride:i * stride + size, j * stride:j * stride + size]
      patches[:, i * gw + j] = np.einsum("bpqc,pqcd->bd", window, kernel) + bias
  lead = np.concatenate([p["cls_token"], p["part_tokens"]], 1)
  t = np.concatenate([np.repeat(lead, len(x), 0), patches], 1) + p["pos_embed"]
  hd = d // heads
  for i in range(m.vit_depth):
    blk = p[f"blocks_{i}"]
    y = layer_norm(t, blk["norm1"])
    qkv = y @ blk["attn"]["qkv"]["kernel"] + blk["attn"]["qkv"]["bias"]
    out = np.zeros_like(y)
    for h in range(heads):
      q = qkv[..., h * hd:(h + 1) * hd]
      k = qkv[..., d + h * hd:d + (h + 1) * hd]
      v = qkv[..., 2 * d + h * hd:2 * d + (h + 1) * hd]
      logits = np.where(mask, q @ np.swapaxes(k, 1, 2) * hd ** -0.5, -1e3)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      out[..., h * hd:(h + 1) * hd] = (w / w.sum(-1, keepdims=True) * mask) @ v
    t = t + out @ blk["attn"]["proj"]["kernel"] + blk["attn"]["proj"]["bias"]
    y = layer_norm(t, blk["norm2"]) @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"]
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    t = t + y @ blk["mlp"]["fc2"]["kernel"] + blk["mlp"]["fc2"]["bias"]
  return layer_norm(t, p["norm"])


def test_prefill_stores_the_train_mode_part_tokens_of_every_visited_image(synthetic_data_dir):
  c = tiny_config(synthetic_data_dir)
  model = registry.build_model(c)
  variables = perturbed(init_variables(model, jax.random.key(0), 64, 32))
  split = datasets.load_train(c.dataset.train, data_dir=synthetic_data_dir)
  n = 10
  memory = {"bank": np.zeros((3, n, 16), np.float32), "filled": np.zeros(n, bool),
            "labels": np.zeros(n, np.int32)}
  plan = np.array([[0, 1, 2, 2], [3, 0, 4, 1], [5, 6, 0, 3]])   # repeats within and across
  augment = c.data.augment.to_dict()
  got = prefill.fill_bank(model, variables, memory, split, plan, seed=3, height=64, width=32,
                          augment=augment, momentum=0.1, num_threads=1)

  want = np.zeros((3, n, 16))
  seen = np.zeros(n, bool)
  regions = []
  batches = pipeline.train_batches(split, plan, epoch=0, seed=3, height=64, width=32,
                                   augment=augment, num_threads=1)
  for b, batch in enumerate(batches):
    images = np.asarray(jax.jit(pipeline.augmented)(batch)["image"])
    _, inter = model.apply(variables, images, method="train_outputs",
                           mutable=["batch_stats", "intermediates"],
                           rngs=prefill.prefill_rngs(3, b))
    rects = np.asarray(inter["intermediates"]["encoder"]["part_regions"][0])
    regions.append(tuple(rects.ravel()))
    parts = numpy_tokens(variables, images, rule_mask(rects, 8, 4), c)[:, 1:4]
    for i, j in enumerate(plan[b]):
      want[:, j] = 0.9 * want[:, j] + 0.1 * parts[i] if seen[j] else parts[i]
      seen[j] = True
  assert len(set(regions)) == len(plan)          # train mode: each batch its own regions
  np.testing.assert_allclose(got["bank"], want, rtol=2e-4, atol=2e-4)
  np.testing.assert_array_equal(got["filled"], seen)
  np.testing.assert_array_equal(got["labels"][seen], split.labels[np.flatnonzero(seen)])
  assert not got["bank"][:, ~seen].any()


def restored_memory(workdir: Path) -> dict:
  manager = ocp.CheckpointManager(workdir.absolute() / "checkpoints")
  step = manager.latest_step()
  train = manager.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore())).train
  manager.close()
  return jax.tree.map(np.asarray, train["memory"])


def test_training_starts_from_the_prefilled_bank_and_a_resume_keeps_it(synthetic_data_dir,
                                                                        tmp_path):
  c = tiny_config(synthetic_data_dir, num_classes=0)
  c.data.update(batch_size=16, num_instances=4)
  c.train.update(epochs=1, stop_at_step=1, checkpoint_every_steps=100)
  split = datasets.load_train(c.dataset.train, data_dir=synthetic_data_dir)
  assert registry.train_and_evaluate(c, tmp_path / "run") == {}
  after_one = restored_memory(tmp_path / "run")

  filled = prefill.prefilled_memory(c, split, None)   # c as trained
  # the pass covers one epoch of the training sampler, drawn under its own seed
  shifted = ml_collections.ConfigDict(c.to_dict())
  shifted.seed = c.seed + prefill.PREFILL_SEED
  visited = np.unique(make_sampler(shifted, split).epoch_plan(0))
  assert filled["filled"].sum() == len(visited) > c.data.batch_size
  assert filled["filled"][visited].all()
  batch_one = make_sampler(c, split).epoch_plan(0)[0]
  untouched = np.setdiff1d(np.arange(len(split.labels)), batch_one)
  np.testing.assert_array_equal(after_one["filled"],
                                filled["filled"] | np.isin(np.arange(len(split.labels)),
                                                           batch_one))
  np.testing.assert_allclose(after_one["bank"][:, untouched], filled["bank"][:, untouched],
                             rtol=1e-6, atol=1e-6)

  c.train.stop_at_step = 2                          # resume: the bank comes from the checkpoint
  assert registry.train_and_evaluate(c, tmp_path / "run") == {}
  log = (tmp_path / "run" / "train.log").read_text()
  assert log.count("part memory bank pre-filled") == 1

  off = tiny_config(synthetic_data_dir, num_classes=0)
  off.data.update(batch_size=16, num_instances=4)
  off.train.update(epochs=1, stop_at_step=1, checkpoint_every_steps=100)
  off.train.pat.prefill = False
  assert registry.train_and_evaluate(off, tmp_path / "off") == {}
  assert restored_memory(tmp_path / "off")["filled"].sum() == len(set(batch_one))


def regions_and_features(model, variables, images):
  f, inter = model.apply(variables, images, method="encode", mutable=["intermediates"])
  return np.asarray(inter["intermediates"]["encoder"]["part_regions"][0]), np.asarray(f)


@pytest.mark.parametrize("random_test_masks", [True, False])
def test_test_masks_per_batch(random_test_masks):
  c = tiny_config(random_test_masks=random_test_masks)
  model = registry.build_model(c)
  variables = perturbed(init_variables(model, jax.random.key(0), 64, 32))
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (1, 64, 32, 3), dtype=np.uint8)
  batches = [np.concatenate([x, rng.integers(0, 256, (3, 64, 32, 3), dtype=np.uint8)])
             for _ in range(4)]
  out = [regions_and_features(model, variables, b) for b in batches]
  bands = pat_model.bands(8, 4)
  if random_test_masks:
    assert len({tuple(r.ravel()) for r, _ in out}) == len(batches)
    for rects, _ in out:
      for (t, bt, l, r), (t0, b0, l0, r0) in zip(rects, bands):
        assert t0 <= t < bt <= b0 and l0 <= l < r <= r0
  else:
    for rects, _ in out:
      np.testing.assert_array_equal(rects, bands)
  # the same image in two batches: the same feature only under the deterministic full bands
  gap = np.abs(out[0][1][0] - out[1][1][0]).max()
  assert (gap > 1e-4) if random_test_masks else (gap < 1e-6)
  # one mask for the whole batch, a function of the batch and the seed only
  twin = regions_and_features(model, variables, np.concatenate([x, x]))[1]
  np.testing.assert_allclose(twin[0], twin[1], rtol=1e-6, atol=1e-6)
  again = regions_and_features(model, variables, batches[0])
  np.testing.assert_array_equal(again[0], out[0][0])
  np.testing.assert_array_equal(again[1], out[0][1])
  other = registry.build_model(tiny_config(random_test_masks=random_test_masks, test_mask_seed=1))
  rects = [regions_and_features(other, variables, b)[0] for b in batches]
  changed = [not np.array_equal(r, o[0]) for r, o in zip(rects, out)]
  assert any(changed) if random_test_masks else not any(changed)
  # the features are those of the batch's regions (full bands when off)
  for (rects, feats), b in zip(out[:2], batches):
    tokens = numpy_tokens(variables, b, rule_mask(rects, 8, 4), c)[:, 0]
    want = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    np.testing.assert_allclose(feats, want, rtol=2e-4, atol=2e-4)
