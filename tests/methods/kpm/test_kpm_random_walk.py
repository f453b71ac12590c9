"""The KPM authors' released evaluation (YantaoShen/kpm_rw_person_reid, reid/evaluators.py:
`CascadeEvaluator` + `compute_random_walk`, distance = softmax(·)[different]), transcribed here
in PyTorch/NumPy on a small released-layout model, against jaxreid's top-k re-scoring with the
group-shuffling random walk: in the evaluator and through `main.py --mode=rank`."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import jaxreid
from jaxreid.methods.kpm.random_walk import random_walk
from test_kpm_convert import MEAN, STD, authors_model

GROUPS, ALPHA, TOP = 2, 0.95, 4
SCALE = 4.0          # the embeds' classifier weights ×SCALE: walked distances spread over ~0.1
H, W = 384, 128        # an official file loads at the authors' input size


def numpy_walk(probe, gallery, alpha):
  """compute_random_walk's step for one (embed, group) pair: probe [k, 2] class logits, gallery
  [k, k, 2]; row softmax of the "same" logits with −∞ on the diagonal, then
  probe ← ((1 − α)(I − α A)⁻¹)ᵀ applied from the right to each class row."""
  k = len(probe)
  s = gallery[:, :, 1].astype(np.float64).copy()
  np.fill_diagonal(s, -np.inf)
  a = np.exp(s - s.max(1, keepdims=True))
  a /= a.sum(1, keepdims=True)
  walk = (1 - alpha) * np.linalg.inv(np.eye(k) - alpha * a)
  return (probe.T.astype(np.float64) @ walk.T).T


def authors_distances(net, resnet, query, gallery, top, alpha):
  """CascadeEvaluator.evaluate: Euclidean first stage on the average-pooled maps, each query's
  `top` re-scored by compute_random_walk (every embed h on every channel group j: p2g logits
  walked over the g2g logits of the pooled maps; mean over (h, j)), distance = softmax[:, 0];
  the rest moved behind by the gap max(bar + 1 − d[top], 0)."""
  prep = lambda im: ((torch.from_numpy(im).float() / 255 - MEAN) / STD).permute(0, 3, 1, 2)
  with torch.no_grad():
    fq, fg = resnet(prep(query), "layer4"), resnet(prep(gallery), "layer4")
    pq, pg = fq.mean((2, 3)).double().numpy(), fg.mean((2, 3)).double().numpy()
    dist = (pq ** 2).sum(1)[:, None] + (pg ** 2).sum(1)[None] - 2 * pq @ pg.T
    order = np.argsort(dist, axis=1)
    count = fq.shape[1] // GROUPS
    for i in range(len(query)):
      g = fg[order[i, :top]]
      outputs = []
      for h in range(GROUPS):
        embed = getattr(net, f"embed_{h}")
        for j in range(GROUPS):
          chunk = lambda x: x[:, j * count:(j + 1) * count]
          p_g = embed(chunk(fq[i:i + 1]), chunk(g))[0].numpy()                # [top, 2]
          pooled = chunk(g).mean((2, 3))
          diff = (pooled[None] - pooled[:, None]) ** 2                        # g2g branch
          g_g = embed.classifier(embed.bn(diff.reshape(top * top, -1))).reshape(top, top, 2)
          outputs.append(numpy_walk(p_g, g_g.numpy(), alpha))
      logits = np.mean(outputs, 0)
      e = np.exp(logits - logits.max(1, keepdims=True))
      dist[i, order[i, :top]] = (e / e.sum(1, keepdims=True))[:, 0]
    for i in range(len(query)):
      bar = dist[i, order[i, :top]].max()
      gap = max(bar + 1.0 - dist[i, order[i, top]], 0.0)
      dist[i, order[i, top:]] += gap
  return dist


def assert_same_order(authors, ranked, tol=1e-3):
  """Every pair of gallery entries whose authors' distances differ by more than tol × their
  spread is ranked in the authors' order; `ranked` [Q, G] are gallery indices, best first."""
  for d, row in zip(authors, ranked):
    position = np.empty(len(row), int)
    position[row] = np.arange(len(row))
    margin = tol * (d.max() - d.min())
    closer = d[:, None] < d[None, :] - margin
    assert closer.any()
    assert (position[:, None] < position[None, :])[closer].all(), (d, row)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """A released-layout checkpoint (random weights) and 3 query and 7 gallery images of
  random 32-pixel blocks."""
  net, resnet = authors_model(GROUPS, seed=1)
  with torch.no_grad():
    for h in range(GROUPS):
      getattr(net, f"embed_{h}").classifier.weight.mul_(SCALE)
  state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
  root = tmp_path_factory.mktemp("kpm_walk")
  torch.save({"state_dict": state, "epoch": 3}, root / "model_best.pth.tar")
  rng = np.random.default_rng(3)
  blocks = rng.integers(0, 256, (10, H // 32, W // 32, 3), dtype=np.uint8)
  images = np.kron(blocks, np.ones((1, 32, 32, 1), np.uint8))
  images = np.clip(images + rng.integers(-20, 21, images.shape), 0, 255).astype(np.uint8)
  for split, part in (("query", images[:3]), ("gallery", images[3:])):
    (root / split).mkdir()
    for i, image in enumerate(part):
      Image.fromarray(image).save(root / split / f"{split}{i}.png")
  return net, resnet, root, images[:3], images[3:]


def test_random_walk_matches_the_authors_step():
  rng = np.random.default_rng(0)
  p_g, g_g = rng.normal(size=(5, 2)), rng.normal(size=(5, 5, 2)) * 3
  want = numpy_walk(p_g, g_g, 0.9)
  got = random_walk(p_g.T.astype(np.float32),
                    np.broadcast_to(g_g[:, :, 1], (2, 5, 5)).astype(np.float32), 0.9)
  np.testing.assert_allclose(np.asarray(got).T, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(random_walk(p_g, g_g[..., 1], 0.0), p_g)


def test_rescored_walk_ranks_as_the_authors_evaluator(released):
  """The evaluator's scorer (what --mode=eval ranks by; `ReidModel.ranking_scores`) on the
  converted model: the walked logits are the authors' distances through sigmoid(−logit) and
  rank every query alike."""
  net, resnet, root, query, gallery = released
  model = jaxreid.load("configs/kpm.py:released", root / "model_best.pth.tar")
  with model.config.unlocked():
    model.config.eval.rescore_top_k = TOP
  want = authors_distances(net, resnet, query, gallery, TOP, ALPHA)
  scores = model.ranking_scores(model.encode(query), model.encode(gallery))
  assert_same_order(want, np.argsort(-scores, axis=1, kind="stable"))
  top = np.argsort(want, axis=1)[:, :TOP]
  np.testing.assert_allclose(1 / (1 + np.exp(np.take_along_axis(scores, top, 1))),
                             np.take_along_axis(want, top, 1), atol=1e-4)
  with model.config.unlocked():      # α = 0: the plain re-scored logits
    model.config.eval.random_walk_alpha = 0.0
  plain = model.ranking_scores(model.encode(query), model.encode(gallery))
  np.testing.assert_allclose(np.take_along_axis(plain, top, 1), np.take_along_axis(
      model.score(query, gallery), top, 1), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.take_along_axis(plain, top, 1), np.take_along_axis(scores, top, 1))


def test_main_rank_ranks_as_the_authors_evaluator(released, tmp_path):
  """`main.py --config configs/kpm.py:released --mode=rank` (α = 0.95; top 4 of 7 so the
  cascade matters) orders every query's whole gallery as the authors' evaluation does."""
  net, resnet, root, query, gallery = released
  out = tmp_path / "rank"
  done = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/kpm.py:released",
       "--checkpoint", str(root / "model_best.pth.tar"), "--mode=rank",
       "--query", str(root / "query"), "--gallery", str(root / "gallery"),
       "--top_k", str(len(gallery)), "--workdir", str(tmp_path), "--output", str(out),
       f"--config.eval.rescore_top_k={TOP}", "--compilation_cache="],
      capture_output=True, text=True, cwd=jaxreid.api.configs_dir().parent, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  index = json.loads((out / "ranking.json").read_text())
  assert [r["query"] for r in index["rankings"]] == [f"query{i}.png" for i in range(3)]
  ranked = [[e["gallery_index"] for e in r["ranked"]] for r in index["rankings"]]
  want = authors_distances(net, resnet, query, gallery, TOP, ALPHA)
  assert_same_order(want, np.asarray(ranked))
  for i, r in enumerate(index["rankings"]):   # the top 4: sigmoid(−score) = the authors' P(diff)
    top = {e["gallery_index"]: e["score"] for e in r["ranked"][:TOP]}
    assert set(top) == set(np.argsort(want[i])[:TOP])
    np.testing.assert_allclose([1 / (1 + np.exp(s)) for s in top.values()],
                               want[i, list(top)], atol=1e-4)
