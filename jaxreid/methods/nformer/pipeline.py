"""The NFormer pipeline (docs/methods/nformer.md): stage 1 = the embedding baseline (ResNet →
GAP → Linear → BNNeck, the paper's "Res50"), trained by the one training loop; stage 2 freezes
it and trains the NFormer head through the same loop on sets of its train features (post-BN
vectors of the CNN in eval mode: the official code collects `model.eval()` outputs with
TEST.NECK_FEAT "after"): extracted again before every epoch through the augmenting train
transform and not normalised (`nformer.extract_every_epoch`, official), or extracted once and
cached (eval transform or `train_views` augmented views, `nformer.normalize_train`);
evaluation refines query + gallery as one set before cosine ranking.

Stage 2 checkpoints live in workdir/nformer/, so an interrupted run resumes where it stopped;
results.json holds both stages.
"""
import json
import logging
import os
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxreid import parallel
from jaxreid.checkpoint import Checkpointer, restore_for_eval
from jaxreid.data import datasets, pipeline
from jaxreid.eval.evaluator import evaluate_matcher, extract, write_results
from jaxreid.methods.nformer.model import NFormer
from jaxreid.methods.nformer.refine import STAGE2_DIR, build_head
from jaxreid.methods.nformer.objective import (SETS, create_state, make_optimizer, sample_sets,
                                               set_shape, steps_per_epoch)
from jaxreid.nn.norms import l2_normalize
from jaxreid.train import loop
from jaxreid.train.state import TrainState

def resolve(config) -> ml_collections.ConfigDict:
  """A copy of `config` with nformer.dim (0 → model.embed_dim) filled in."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.nformer.dim:
    config.nformer.dim = int(config.model.embed_dim)
  return config


def train_stage2(config, features: np.ndarray | None, labels: np.ndarray, num_classes: int,
                 workdir, log=None, extract_view=None) -> tuple[dict, TrainState]:
  """Trains the NFormer head of `config` (resolved, see `resolve`) on cached train `features`
  [N, d], or [V, N, d] (V views, e.g. augmented extractions: epoch e uses view e mod V), with
  `labels` (0..num_classes-1), through the training loop, resuming from
  workdir/nformer/checkpoints. `extract_view(epoch)` → [N, d] instead gives each epoch its own
  features, computed when the epoch starts (the official per-epoch re-extraction; `features`
  may then be None). A batch is `sets_per_step` sets drawn by `sample_sets` for the global
  step, so a resumed run draws the same sets. Returns ({"params", "batch_stats"}, final
  state); ({}, state) when stopped by nformer.stop_at_step."""
  nf = config.nformer

  def prepare(views):
    if views.shape[-1] != nf.dim:
      raise ValueError(f"nformer.dim={nf.dim} but the stage-1 features have {views.shape[-1]} "
                       "dimensions; set nformer.dim=0 to follow model.embed_dim.")
    units = np.asarray(l2_normalize(views))
    if nf.normalize_train:
      views = units
    # The sets' neighbour search: cosine, or the official NFormerDataset's raw dot product
    # (1 − f_c·f_j on the features as given: unnormalised in official training).
    metric = nf.get("set_metric", "cosine")
    if metric not in ("cosine", "dot"):
      raise ValueError(f"nformer.set_metric={metric!r} is unknown; use 'cosine' or 'dot'.")
    return views, (units if metric == "cosine" else views)

  if extract_view is None:
    views, units = prepare(features if features.ndim == 3 else features[None])
    view_of = lambda epoch: (views[epoch % len(views)], units[epoch % len(views)])
  else:
    current = {}

    def view_of(epoch):
      if current.get("epoch") != epoch:
        current.update(epoch=epoch, view=prepare(np.asarray(extract_view(epoch))[None]))
      view, unit = current["view"]
      return view[0], unit[0]
  n = len(labels)
  sets, size = set_shape(nf, n)
  per_epoch = steps_per_epoch(nf, n)
  head = build_head(nf, num_classes)
  tx = make_optimizer(nf)

  def batches(plan, epoch, start_batch):
    view, unit = view_of(epoch)
    if len(view) != n:
      raise ValueError(f"the train features have {len(view)} rows but there are {n} labels.")
    for step in plan[start_batch:, 0]:
      yield sample_sets(view, labels, sets=sets, size=size, unit=unit, seed=config.seed,
                        step=int(step))

  workdir = Path(workdir)
  task = loop.Task(
      name="nformer", state=create_state(head, tx, sets, size, jax.random.key(config.seed + 1)),
      step=loop.make_train_step(head, tx, SETS, nf), epochs=int(nf.epochs),
      plan=lambda epoch, state: (epoch * per_epoch + np.arange(per_epoch))[:, None],
      batches=batches, evaluate=None, config=config, checkpoint_dir=workdir / STAGE2_DIR,
      mesh=parallel.make_mesh(jax.local_devices()[:1]),   # sets are not sharded
      log_every_steps=nf.log_every_steps, checkpoint_every_steps=nf.checkpoint_every_steps,
      keep_checkpoints=config.train.keep_checkpoints, stop_at_step=nf.get("stop_at_step"),
      learning_rates=lambda state: {"nformer": float(nf.lr)})   # constant (objective.py)
  workdir.mkdir(parents=True, exist_ok=True)
  writer = loop.summary_writer(workdir)
  try:
    results, state = loop.run(task, log or logging.getLogger(__name__), writer)
  finally:
    loop.clean_up(writer.close)
  if results is None:
    return {}, state
  return {"params": state.params, "batch_stats": state.batch_stats}, state


def make_refiner(head: NFormer, variables, *, query_interaction: bool = False,
                 landmark_seed: int = 0):
  """refine(q [P, d], g [G, d]) → (q', g'): the L2-normalised query + gallery features refined as
  one set, post-BN outputs. Queries attend to no other query unless `query_interaction`
  (official code). Landmarks come from a fixed key, so every run gives the same result."""
  key = jax.random.key(landmark_seed)

  def refine(q, g):
    q, g = np.asarray(q, np.float32), np.asarray(g, np.float32)
    x = l2_normalize(np.concatenate([q, g]))
    _, post, _ = head.apply(variables, x, key, num_queries=0 if query_interaction else len(q))
    post = np.asarray(post)
    return post[:len(q)], post[len(q):]

  return refine


def stage2_refiner(config, variables):
  nf = config.nformer
  head = build_head(nf, 0)
  eval_vars = {"params": {k: v for k, v in variables["params"].items() if k != "classifier"},
               "batch_stats": variables["batch_stats"]}
  return make_refiner(head, eval_vars, query_interaction=bool(nf.query_interaction),
                      landmark_seed=int(nf.landmark_seed))


def checkpoint_refiner(config, checkpoint):
  """`stage2_refiner` of the stage-2 head in checkpoint/nformer (a run's workdir), its shapes
  (dim, heads, ffn, layers) from the saved config, the rest from `config`."""
  nf_config, nf_vars = restore_for_eval(str(Path(checkpoint) / STAGE2_DIR))
  config = resolve(config)
  with config.unlocked():
    config.nformer.update({k: nf_config.nformer[k] for k in ("dim", "heads", "ffn", "layers")})
  return stage2_refiner(config, nf_vars)


def _stage1(workdir: Path, stage1_method):
  """(config, model, variables) of the stage-1 run in `workdir` (best, else latest)."""
  saved, variables = restore_for_eval(str(workdir))
  return saved, stage1_method.build(saved), variables


def augmented_features(config, model, variables, split, mesh, view: int) -> np.ndarray:
  """Stage-1 (eval-mode) vectors of every train image under the training augmentation
  (data.augment), drawn for `view` — the official code re-extracts its train features through
  the augmenting train loader before every NFormer epoch."""
  batch_size = config.eval.batch_size
  n = len(split)
  plan = (np.arange(-(-n // batch_size) * batch_size) % n).reshape(-1, batch_size)

  def encode_augmented(variables, batch):
    return model.apply(variables, pipeline.augmented(batch)["image"], method="encode")

  encode = jax.jit(encode_augmented, out_shardings=parallel.replicated(mesh),
                   in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)))
  variables = parallel.replicate(variables, mesh)
  out = []
  for batch in pipeline.train_batches(split, plan, epoch=view, seed=config.seed + 7919,
                                      height=config.data.height, width=config.data.width,
                                      augment=config.data.augment.to_dict(),
                                      num_threads=config.data.num_threads,
                                      num_workers=config.data.get("num_workers", 0),
                                      resize=config.data.get("resize", "bicubic")):
    batch = {k: batch[k] for k in ("image", "augment") if k in batch}
    batch = jax.tree.map(lambda x: parallel.put_global(x, parallel.batch_sharded(mesh)), batch)
    out.append(parallel.replicated_to_host(encode(variables, batch)))
  return np.concatenate(out)[:n]


def train_features(config, nf, model, variables, mesh, workdir: Path, step: int):
  """The stage-1 post-BN vectors of the train split: [N, d] with the eval transform
  (nformer.train_views = 0), or [V, N, d], V augmented extractions; cached in
  workdir/nformer/train_features_<step>_<V>.npz. With the labels and the number of ids."""
  split = datasets.load_train(config.dataset.train, data_dir=config.dataset.data_dir,
                              manual_dir=config.dataset.manual_dir)
  views = int(nf.get("train_views", 0))
  path = workdir / STAGE2_DIR / f"train_features_{step}_{views}.npz"
  if path.exists():
    try:
      with np.load(path) as cache:
        features = cache["features"]
    except Exception as e:  # noqa: BLE001 - truncated or damaged (zipfile errors): extract again
      logging.getLogger(__name__).warning("%s cannot be read (%s); extracting again", path, e)
      features = None
    if features is not None and features.shape[-2] == len(split):
      return features, split.labels, split.num_classes
  if views:
    features = np.stack([augmented_features(config, model, variables, split, mesh, v)
                         for v in tqdm(range(views), desc="nformer: augmented train features",
                                       leave=False)])
  else:
    features = extract(model, variables, split, config, mesh, desc="nformer: train features")
  if jax.process_index() == 0:      # written whole or not at all: a kill leaves no half file
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
      np.savez(f, features=features)
    os.replace(partial, path)
  return features, split.labels, split.num_classes


def train_and_evaluate(config, workdir: str, stage1_method, mesh=None) -> dict:
  """`python main.py --config configs/nformer.py`: stage 1 (the training loop on the model of
  `stage1_method`, the method of config.model.name: the "Res50" numbers), stage 2 on its cached
  train features, evaluation with NFormer refinement.
  Returns (and writes to workdir/results.json) {"test": NFormer results per test set,
  "stage1": the stage-1 results, "paper": the NFormer paper's numbers, ...}; {} when stopped
  early by train.stop_at_step or nformer.stop_at_step."""
  workdir = Path(workdir)
  mesh = mesh or parallel.make_mesh()
  t0 = time.time()
  # Stage 2 keeps checkpoints of its own, which stage 1's run never reads: a rerun may change
  # the nformer.* fields.
  stage1 = loop.train_and_evaluate(config, workdir, stage1_method, mesh=mesh,
                                   resumable=("nformer.",))
  if not stage1:
    return {}
  s1_config, model, variables = _stage1(workdir, stage1_method)
  if "test" not in stage1:       # stage 1 was already complete: evaluate it again
    stage1 = {**evaluate_matcher(s1_config, model, variables, mesh), **stage1}
  t1 = time.time()
  config = resolve(config)
  log = loop.file_logger(workdir)
  extraction_seconds = []
  if config.nformer.get("extract_every_epoch", False):
    # Official: before every NFormer epoch, the train split through the augmenting train
    # transform, CNN in eval mode, not normalised (nformer.normalize_train).
    split = datasets.load_train(s1_config.dataset.train, data_dir=s1_config.dataset.data_dir,
                                manual_dir=s1_config.dataset.manual_dir)
    features, labels, num_classes = None, split.labels, split.num_classes

    def extract_view(epoch):
      t = time.time()
      out = augmented_features(s1_config, model, variables, split, mesh, epoch)
      extraction_seconds.append(time.time() - t)
      log.info("nformer: epoch %d train features extracted in %.1f s", epoch + 1,
               extraction_seconds[-1])
      return out
  else:
    extract_view = None
    features, labels, num_classes = train_features(s1_config, config.nformer, model, variables,
                                                   mesh, workdir, int(stage1.get("step", 0)))
  with config.unlocked():
    config.nformer.num_classes = int(num_classes)
    config.model.num_classes = int(s1_config.model.get("num_classes", 0))
  nf_vars, state = train_stage2(config, features, labels, num_classes, workdir, log,
                                extract_view=extract_view)
  if not nf_vars:
    return {}
  t2 = time.time()
  results = evaluate_matcher(s1_config, model, variables, mesh, workdir=workdir,
                             refine=stage2_refiner(config, nf_vars))
  first = next(iter(results["test"].values()))
  ckpt = Checkpointer(workdir / STAGE2_DIR, keep=config.train.keep_checkpoints)
  ckpt.save_best(state, config, first)
  ckpt.wait()
  ckpt.close()
  results.update(
      paper=config.nformer.paper.to_dict(), step=int(state.step),
      stage1={k: stage1[k] for k in ("test", "paper", "step") if k in stage1},
      seconds={"stage1": round(t1 - t0, 1), "stage2": round(t2 - t1, 1),
               "eval": round(time.time() - t2, 1),
               **({"train_features_per_epoch": [round(s, 2) for s in extraction_seconds]}
                  if extraction_seconds else {})})
  log.info("nformer eval: %s", json.dumps(results["test"]))
  write_results(workdir, results)
  return results


def evaluate(config, checkpoint: str, stage1_method, workdir: str | None = None,
             mesh=None) -> dict:
  """--mode=eval for NFormer: the stage-1 run in `checkpoint` (a workdir; `stage1_method`: the
  method of its model) with the stage-2 head of checkpoint/nformer, evaluated with refinement
  ("test") and without ("stage1"); written to workdir/results.json when a workdir is given."""
  checkpoint = Path(checkpoint)
  mesh = mesh or parallel.make_mesh()
  s1_config, model, variables = _stage1(checkpoint, stage1_method)
  stage1 = evaluate_matcher(s1_config, model, variables, mesh)
  results = evaluate_matcher(s1_config, model, variables, mesh, workdir=workdir,
                             refine=checkpoint_refiner(config, checkpoint))
  results.update(paper=resolve(config).nformer.paper.to_dict(), stage1=stage1,
                 checkpoint=str(checkpoint))
  if workdir is not None:
    write_results(workdir, results)
  return results
