"""NFormer stage 2 and the whole NFormer pipeline (METHODS.md, NFormer).

Stage 1 is the embedding model (`train_and_evaluate` of configs/embedding.py, the paper's "Res50").
Stage 2 freezes it: the train split is encoded once (eval transform, post-BN vectors: the official
code collects `model.eval()` outputs of the BNNeck model, TEST.NECK_FEAT "after"), L2-normalised
(as at test time; option `nformer.normalize_train`), and the NFormer module (`NFormer`) is
trained on sets = a random centre's nearest neighbours (`sample_sets`) with label-smoothed CE +
batch-hard triplet + center loss, Adam. Evaluation refines query + gallery as one set
(`make_refiner`) before cosine ranking.

Checkpoints of stage 2 live in workdir/nformer/ (the same Orbax `Checkpointer` as stage 1), so an
interrupted run resumes where it stopped; results.json holds both stages.
"""
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxreid import losses, parallel
from jaxreid.checkpoint import Checkpointer, restore_for_eval
from jaxreid.data import datasets, pipeline
from jaxreid.evaluate import _jitted_encode, evaluate_matcher, extract, write_results
from jaxreid.models import build_model, l2_normalize
from jaxreid.nformer import NFormer
from jaxreid.train import TrainState, _file_logger, train_and_evaluate

STAGE2_DIR = "nformer"


def build_head(nf, num_classes: int | None = None) -> NFormer:
  """The NFormer module of config block `nf` (config.nformer; dim must be resolved)."""
  return NFormer(dim=int(nf.dim), heads=int(nf.heads), ffn=int(nf.ffn), layers=int(nf.layers),
                     k=int(nf.k), num_landmarks=int(nf.num_landmarks),
                     num_classes=int(nf.num_classes if num_classes is None else num_classes),
                     block=int(nf.block))


def resolve(config) -> ml_collections.ConfigDict:
  """A copy of `config` with nformer.dim (0 → model.embed_dim) filled in."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.nformer.dim:
    config.nformer.dim = int(config.model.embed_dim)
  return config


# ---------------------------------------------------------------------------- sets

def set_shape(nf, n: int) -> tuple[int, int]:
  """(sets per step, rows per set): set_size clipped to the n training rows."""
  return int(nf.sets_per_step), min(int(nf.set_size), n)


def steps_per_epoch(nf, n: int) -> int:
  """The official epoch: n // 30 sets (nformer.sets_per_epoch_divisor), in steps of
  sets_per_step sets."""
  return max(1, n // (int(nf.sets_per_epoch_divisor) * int(nf.sets_per_step)))


def sample_sets(features: np.ndarray, labels: np.ndarray, *, sets: int, size: int, seed: int,
                step: int, unit: np.ndarray | None = None) -> dict:
  """The batch of training step `step`: `sets` sets of `size` rows, each drawn as the official
  NFormerDataset does: a random centre row, its ⌊size·(1+u)⌋ nearest rows by cosine
  similarity (u ~ U[0, 1), clipped to N), `size` of them at random, in random order.
  Deterministic in (seed, step), so a resumed run draws the same sets. `unit`: the
  L2-normalised `features`, when the caller has them (computed here otherwise).
  Returns {"features" float32 [sets, size, d], "labels" int32 [sets, size]}."""
  n = len(features)
  if not 1 <= size <= n:
    raise ValueError(f"set size {size} must lie in [1, {n}] (the number of training rows).")
  rng = np.random.default_rng([seed, step])
  if unit is None:
    unit = np.asarray(l2_normalize(features))
  rows = []
  for _ in range(sets):
    centre = int(rng.integers(n))
    candidates = min(n, int(size * (1 + rng.random())))
    nearest = np.argsort(-(unit @ unit[centre]), kind="stable")[:candidates]
    rows.append(rng.choice(nearest, size, replace=False))
  rows = np.stack(rows)
  return {"features": features[rows].astype(np.float32), "labels": labels[rows].astype(np.int32)}


# ---------------------------------------------------------------------------- training

def make_optimizer(nf) -> optax.GradientTransformation:
  """L2 weight decay added to the gradient, then Adam at the constant nformer.lr."""
  return optax.chain(optax.add_decayed_weights(float(nf.weight_decay)), optax.adam(float(nf.lr)))


def create_state(head: NFormer, tx, sets: int, size: int, rng) -> TrainState:
  init_rng, center_rng, state_rng = jax.random.split(rng, 3)
  dummy = jnp.zeros((sets, size, head.dim), jnp.float32)
  variables = jax.jit(lambda r: head.init(r, dummy, r, train=True))(init_rng)
  params = variables["params"]
  centers = jax.random.normal(center_rng, (head.num_classes, head.dim))  # torch.randn, as stage 1
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"], opt_state=tx.init(params),
                    memory={"centers": centers}, rng=state_rng)


def make_train_step(head: NFormer, tx, nf):
  """(state, batch) → (state, metrics), pure; batch = `sample_sets` output. Landmarks come from
  the step's key (fold_in(state.rng, step)); the centres follow plain SGD (nformer.center_lr)
  on the unweighted center loss, as reid-strong-baseline."""

  def loss_fn(params, state, batch):
    key = jax.random.fold_in(state.rng, state.step)
    variables = {"params": params, "batch_stats": state.batch_stats}
    (pre, _, logits), upd = head.apply(variables, batch["features"], key, train=True,
                                       mutable=["batch_stats"])
    pre, logits = pre.reshape(-1, head.dim), logits.reshape(-1, head.num_classes)
    labels = batch["labels"].reshape(-1)
    ce = losses.cross_entropy_label_smooth(logits, labels, nf.label_smoothing)
    tri = losses.batch_hard_triplet_loss(pre, labels, nf.triplet_margin)
    cen = losses.center_loss(pre, labels, state.memory["centers"])
    loss = ce + tri + nf.center_weight * cen
    aux = {"batch_stats": upd["batch_stats"], "pre": jax.lax.stop_gradient(pre),
           "metrics": {"ce": ce, "triplet": tri, "center": cen,
                       "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}}
    return loss, aux

  def train_step(state: TrainState, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    center_grad = jax.grad(losses.center_loss, argnums=2)(
        aux["pre"], batch["labels"].reshape(-1), state.memory["centers"])
    centers = state.memory["centers"] - nf.center_lr * center_grad
    metrics = {"loss": loss, **aux["metrics"], "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, batch_stats=aux["batch_stats"],
                         opt_state=opt_state, memory={"centers": centers}), metrics

  return train_step


def train_stage2(config, features: np.ndarray, labels: np.ndarray, num_classes: int,
                 workdir, log=None) -> tuple[dict, TrainState]:
  """Trains the NFormer head of `config` (resolved, see `resolve`) on cached train `features`
  [N, d], or [V, N, d] (V views, e.g. augmented extractions: epoch e uses view e mod V), with
  `labels` (0..num_classes-1), resuming from workdir/nformer/checkpoints.
  Returns ({"params", "batch_stats"}, final state); ({}, state) when stopped by
  nformer.stop_at_step."""
  nf = config.nformer
  views = features if features.ndim == 3 else features[None]
  if views.shape[-1] != nf.dim:
    raise ValueError(f"nformer.dim={nf.dim} but the stage-1 features have {views.shape[-1]} "
                     "dimensions; set nformer.dim=0 to follow model.embed_dim.")
  units = np.asarray(l2_normalize(views))   # the neighbour search of every step ranks by cosine
  if nf.normalize_train:
    views = units
  n = views.shape[1]
  sets, size = set_shape(nf, n)
  per_epoch = steps_per_epoch(nf, n)
  total = int(nf.epochs) * per_epoch
  head = build_head(nf, num_classes)
  tx = make_optimizer(nf)
  state = create_state(head, tx, sets, size, jax.random.key(config.seed + 1))
  ckpt = Checkpointer(Path(workdir) / STAGE2_DIR, keep=config.train.keep_checkpoints)
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state = restored[0]
    if log:
      log.info("nformer: resumed from step %d", int(state.step))
  step_fn = jax.jit(make_train_step(head, tx, nf), donate_argnums=0)
  stop_at = nf.get("stop_at_step")
  bar = tqdm(range(int(state.step), total), total=total, initial=int(state.step),
             desc="nformer", leave=False, dynamic_ncols=True)
  try:
    for step in bar:
      view = (step // per_epoch) % len(views)
      batch = sample_sets(views[view], labels, sets=sets, size=size, unit=units[view],
                          seed=config.seed, step=step)
      state, metrics = step_fn(state, batch)
      done = step + 1
      if done % nf.log_every_steps == 0 or done == total:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.3f}")
        if log:
          log.info("nformer step %d/%d epoch %d: %s", done, total, -(-done // per_epoch),
                   " ".join(f"{k}={v:.4f}" for k, v in m.items()))
      data_state = {"epoch": done // per_epoch, "batch": done % per_epoch}
      if done % nf.checkpoint_every_steps == 0 or done % per_epoch == 0 or done == total:
        ckpt.save(state, data_state, config, force=done == total)
      if stop_at is not None and done >= stop_at and done < total:
        ckpt.save(state, data_state, config, force=True)
        return {}, state
    bar.close()
  finally:
    ckpt.wait()
    ckpt.close()
  return {"params": state.params, "batch_stats": state.batch_stats}, state


# ---------------------------------------------------------------------------- evaluation

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


def _stage1(workdir: Path):
  """(config, model, variables) of the stage-1 run in `workdir` (best, else latest)."""
  saved, variables = restore_for_eval(str(workdir))
  return saved, build_model(saved), variables


def augmented_features(config, model, variables, split, mesh, view: int) -> np.ndarray:
  """Stage-1 (eval-mode) vectors of every train image under the training augmentation
  (data.augment), drawn for `view` — the official code re-extracts its train features through
  the augmenting train loader before every NFormer epoch."""
  batch_size = config.eval.batch_size
  n = len(split)
  plan = (np.arange(-(-n // batch_size) * batch_size) % n).reshape(-1, batch_size)
  encode = _jitted_encode(model, mesh)
  variables = parallel.replicate(variables, mesh)
  out = []
  for batch in pipeline.train_batches(split, plan, epoch=view, seed=config.seed + 7919,
                                      height=config.data.height, width=config.data.width,
                                      augment=config.data.augment.to_dict(),
                                      num_threads=config.data.num_threads):
    images = parallel.put_global(batch["image"], parallel.batch_sharded(mesh))
    out.append(parallel.replicated_to_host(encode(variables, images)))
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
    features = np.load(path)["features"]
    if features.shape[-2] == len(split):
      return features, split.labels, split.num_classes
  if views:
    features = np.stack([augmented_features(config, model, variables, split, mesh, v)
                         for v in tqdm(range(views), desc="nformer: augmented train features",
                                       leave=False)])
  else:
    features = extract(model, variables, split, config, mesh, desc="nformer: train features")
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=features)
  return features, split.labels, split.num_classes


def train_and_evaluate_nformer(config, workdir: str, mesh=None) -> dict:
  """`python main.py --config configs/nformer.py`: stage 1 (train_and_evaluate, the "Res50"
  numbers), stage 2 on its cached train features, evaluation with NFormer refinement.
  Returns (and writes to workdir/results.json) {"test": NFormer results per test set,
  "stage1": the stage-1 results, "paper": the NFormer paper's numbers, ...}; {} when stopped
  early by train.stop_at_step or nformer.stop_at_step."""
  workdir = Path(workdir)
  mesh = mesh or parallel.make_mesh()
  t0 = time.time()
  stage1 = train_and_evaluate(config, workdir, mesh=mesh)
  if not stage1:
    return {}
  s1_config, model, variables = _stage1(workdir)
  if "test" not in stage1:       # stage 1 was already complete: evaluate it again
    stage1 = {**evaluate_matcher(s1_config, model, variables, mesh), **stage1}
  t1 = time.time()
  config = resolve(config)
  log = _file_logger(workdir)
  features, labels, num_classes = train_features(s1_config, config.nformer, model, variables,
                                                 mesh, workdir, int(stage1.get("step", 0)))
  with config.unlocked():
    config.nformer.num_classes = int(num_classes)
    config.model.num_classes = int(s1_config.model.get("num_classes", 0))
  nf_vars, state = train_stage2(config, features, labels, num_classes, workdir, log)
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
               "eval": round(time.time() - t2, 1)})
  log.info("nformer eval: %s", json.dumps(results["test"]))
  write_results(workdir, results)
  return results


def evaluate_nformer(config, checkpoint: str, workdir: str | None = None, mesh=None) -> dict:
  """--mode=eval for NFormer: the stage-1 run in `checkpoint` (a workdir) with the stage-2 head
  of checkpoint/nformer, evaluated with refinement ("test") and without ("stage1"); written to
  workdir/results.json when a workdir is given."""
  checkpoint = Path(checkpoint)
  mesh = mesh or parallel.make_mesh()
  s1_config, model, variables = _stage1(checkpoint)
  nf_config, nf_vars = restore_for_eval(str(checkpoint / STAGE2_DIR))
  config = resolve(config)
  with config.unlocked():
    config.nformer.update({k: nf_config.nformer[k] for k in ("dim", "heads", "ffn", "layers")})
  stage1 = evaluate_matcher(s1_config, model, variables, mesh)
  results = evaluate_matcher(s1_config, model, variables, mesh, workdir=workdir,
                             refine=stage2_refiner(config, nf_vars))
  results.update(paper=config.nformer.paper.to_dict(), stage1=stage1,
                 checkpoint=str(checkpoint))
  if workdir is not None:
    write_results(workdir, results)
  return results
