"""--mode=rank ranks image files as --mode=eval ranks the same images of a test set (its
retrieval.npz): a plain pairwise matcher (with and without k-reciprocal re-ranking), KPM's
released evaluation (top-k re-scoring + random walk) and NFormer's refinement."""
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from jaxreid import registry, tools
from jaxreid.api import evaluate_checkpoint, resolve_config
from jaxreid.checkpoint import Checkpointer
from jaxreid.data import datasets, pipeline
from jaxreid.models import init_variables
from test_export import random_variables

NUM_QUERY, NUM_GALLERY = 4, 9
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods" / "kpm"))


@pytest.fixture(scope="module")
def small_test_set(synthetic_data_dir, tmp_path_factory):
  """(load_split replacement, query folder, gallery folder): the first query rows of
  synthetic_reid/domain_b and gallery rows holding a true match of each (the first rows
  otherwise), also written as PNG files in split order."""
  root = tmp_path_factory.mktemp("rank_eval")
  real = datasets.load_split
  q, g = (real("synthetic_reid", s, data_dir=synthetic_data_dir, config="domain_b")
          for s in ("query", "gallery"))
  matches = [np.flatnonzero((g.pids == q.pids[i]) & (g.cams != q.cams[i]))[0]
             for i in range(NUM_QUERY)]
  others = [i for i in range(len(g)) if i not in matches][:NUM_GALLERY - NUM_QUERY]
  count = {"query": np.arange(NUM_QUERY), "gallery": np.sort(np.r_[matches, others])}

  def small(name, split, **kwargs):
    full = real(name, split, **kwargs)
    rows = count[split]
    pick = lambda a: a[rows]
    return dataclasses.replace(
        full, source=[full.source[int(i)] for i in rows], pids=pick(full.pids),
        labels=pick(full.labels), cams=pick(full.cams), times=pick(full.times),
        filenames=[full.filenames[int(i)] for i in rows], domains=pick(full.domains))

  for split in count:
    part = small("synthetic_reid", split, data_dir=synthetic_data_dir, config="domain_b")
    (root / split).mkdir()
    for i in range(len(part)):
      Image.fromarray(pipeline.load_image(part, i)).save(root / split / f"{i:02d}.png")
  return small, root / "query", root / "gallery"


def eval_and_rank(config, checkpoint, small_test_set, tmp_path, monkeypatch, rerank=False):
  """(the ranked gallery indices [Q, G] of --mode=eval's plain row, or "+RR" with `rerank`,
  and those of --mode=rank), through the functions main.py calls."""
  small, query_dir, gallery_dir = small_test_set
  monkeypatch.setattr(datasets, "load_split", small)
  with config.unlocked():
    config.dataset.test = "synthetic_reid/domain_b"
    config.eval.update(retrieval_top_k=NUM_GALLERY, rerank=rerank)
  method = registry.method_of(config)
  if method.evaluate is not None:
    method.evaluate(config, checkpoint, str(tmp_path))
  else:
    evaluate_checkpoint(config, checkpoint, str(tmp_path))
  with np.load(tmp_path / "retrieval.npz") as saved:
    row = "+RR" if rerank else "plain"
    (key,) = [k for k in saved.files if k.endswith(f"/{row}/indices")]
    evaluated = saved[key]
  index = tools.rank(config, checkpoint, str(query_dir), str(gallery_dir), str(tmp_path / "rank"),
                     top_k=NUM_GALLERY, rerank=rerank)
  ranked = np.array([[e["gallery_index"] for e in r["ranked"]] for r in index["rankings"]])
  assert json.loads((tmp_path / "rank" / "ranking.json").read_text())["reranked"] == rerank
  return evaluated, ranked


def save_run(directory, config, variables):
  class State:  # what Checkpointer.save_best reads
    step, params, batch_stats = np.int32(1), variables["params"], variables["batch_stats"]
  ckpt = Checkpointer(directory)
  ckpt.save_best(State, config, {"mAP": 0.5})
  ckpt.wait()
  ckpt.close()


def drawn_run(config, directory):
  """A jaxreid run of `config` with drawn (random, finite) variables in `directory`."""
  module = registry.build_model(config)
  shapes = jax.eval_shape(lambda: init_variables(module, jax.random.key(0), config.data.height,
                                                 config.data.width))
  save_run(directory, config, random_variables(shapes))


@pytest.mark.parametrize("rerank,rescore", [(False, 0), (True, 0), (False, 5)])
def test_plain_pairwise_matcher(synthetic_data_dir, small_test_set, tmp_path, monkeypatch,
                                rerank, rescore):
  """QAConv-GS; with top-5 re-scoring, --mode=eval streams the gallery in chunks of 4."""
  from configs import qaconv_gs
  from training import tiny
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir)
  config.eval.update(rescore_top_k=rescore, batch_size=4, gallery_chunk=4)
  drawn_run(config, tmp_path / "run")
  evaluated, ranked = eval_and_rank(config, str(tmp_path / "run"), small_test_set, tmp_path,
                                    monkeypatch, rerank)
  np.testing.assert_array_equal(ranked, evaluated)


def test_kpm_released_rescoring_and_walk(small_test_set, tmp_path, monkeypatch):
  """configs/kpm.py:released (α = 0.95) on an authors'-layout file, top 5 of 9 re-scored;
  --mode=eval streams the gallery in chunks of 4, --mode=rank scores it in memory."""
  from test_kpm_convert import authors_model
  net, _ = authors_model(2, seed=2)
  state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
  torch.save({"state_dict": state}, tmp_path / "model_best.pth.tar")
  config = resolve_config("configs/kpm.py:released")
  config.eval.update(rescore_top_k=5, batch_size=4, gallery_chunk=4)
  assert config.eval.random_walk_alpha == 0.95
  evaluated, ranked = eval_and_rank(config, str(tmp_path / "model_best.pth.tar"),
                                    small_test_set, tmp_path, monkeypatch)
  np.testing.assert_array_equal(ranked, evaluated)


def test_nformer_refinement(synthetic_data_dir, small_test_set, tmp_path, monkeypatch):
  """A workdir with a drawn stage-1 run and a drawn NFormer head in workdir/nformer."""
  from configs import nformer
  from jaxreid.methods.nformer.pipeline import resolve
  from jaxreid.methods.nformer.refine import STAGE2_DIR, build_head
  config = nformer.get_config()
  config.dataset.update(data_dir=synthetic_data_dir, test="synthetic_reid/domain_b")
  config.model.update(depth=18, width=8)    # (NFormer's --mode=eval reads the run's test sets)
  config.nformer.update(ffn=32, layers=1)
  drawn_run(config, tmp_path / "run")
  head_config = resolve(config)
  head_config.nformer.num_classes = 7
  head = build_head(head_config.nformer)
  dim = head_config.nformer.dim
  shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), np.zeros((32, dim), np.float32),
                                            jax.random.key(0)))
  save_run(tmp_path / "run" / STAGE2_DIR, head_config, random_variables(shapes))
  evaluated, ranked = eval_and_rank(config, str(tmp_path / "run"), small_test_set, tmp_path,
                                    monkeypatch)
  np.testing.assert_array_equal(ranked, evaluated)
