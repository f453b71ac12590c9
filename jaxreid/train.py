"""Training of pairwise matchers: train state, optimiser, the jitted step and the epoch loop."""
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxreid import losses, memory as class_memory, parallel
from jaxreid.checkpoint import Checkpointer
from jaxreid.data import datasets, pipeline
from jaxreid import samplers
from jaxreid.evaluate import evaluate_matcher, extract, match_fn, write_results
from jaxreid.eval.scoring import score_matrix
from jaxreid.models import build_model, feature_map_size, init_variables, is_embedding

LOSSES = ("pairwise", "triplet", "memory", "embedding")
OPTIMIZERS = ("sgd", "adam")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  memory: Any          # class memory / centre-loss centres dict, or {} when the loss needs none
  rng: jax.Array


def _group_labels(params, groups: dict[str, tuple[str, ...]]):
  """Labels each leaf by the group whose module-path prefix it falls under."""
  def label(path, _):
    names = tuple(getattr(k, "key", str(k)) for k in path)
    for group, prefixes in groups.items():
      if any(names[:len(p)] == p for p in prefixes):
        return group
    raise ValueError(f"parameter {'/'.join(names)} belongs to no optimiser group")
  return jax.tree_util.tree_map_with_path(label, params)


NEW_MODULES = (("encoder",), ("matcher",), ("head",))
LR_GROUPS = {"backbone": (("encoder", "backbone"),), "new": NEW_MODULES}
# The feature side (backbone, neck, encoders) and what scores its output (matcher or head).
CLIP_GROUPS = {"features": (("encoder",),), "head": (("matcher",), ("head",))}


def lr_schedule(train_cfg, steps_per_epoch: int):
  """step → lr: ×lr_step_factor at each of lr_step_epochs, after a linear warmup over
  `warmup_epochs` from warmup_factor·lr, the factor updated once per epoch (reid-strong-baseline's
  WarmupMultiStepLR)."""
  milestones = jnp.asarray(sorted(train_cfg.lr_step_epochs) or [1 << 30])
  warmup = train_cfg.get("warmup_epochs", 0)
  start = train_cfg.get("warmup_factor", 1.0)

  def schedule(step):
    epoch = step // steps_per_epoch
    decay = train_cfg.lr_step_factor ** jnp.sum(epoch >= milestones)
    if not warmup:
      return train_cfg.lr * decay
    alpha = jnp.minimum(epoch / warmup, 1.0)
    return train_cfg.lr * decay * (start * (1 - alpha) + alpha)

  return schedule


def make_optimizer(train_cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """Per-group gradient-norm clipping (features, head) → weight decay (L2, added to the gradient)
  → SGD with nesterov momentum or Adam, on `lr_schedule`; the backbone's lr is scaled by
  `backbone_lr_mult`."""
  kind = train_cfg.get("optimizer", "sgd")
  if kind not in OPTIMIZERS:
    raise ValueError(f"train.optimizer={kind!r} is unknown; use one of {OPTIMIZERS}.")
  schedule = lr_schedule(train_cfg, steps_per_epoch)

  def optimizer(mult):
    lr = lambda step: schedule(step) * mult
    if kind == "adam":
      return optax.adam(lr)
    return optax.sgd(lr, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov)

  clip = (optax.clip_by_global_norm(train_cfg.clip_norm) if train_cfg.clip_norm > 0
          else optax.identity())
  clip_labels = functools.partial(_group_labels, groups=CLIP_GROUPS)
  lr_labels = functools.partial(_group_labels, groups=LR_GROUPS)
  return optax.chain(
      optax.multi_transform({"features": clip, "head": clip}, clip_labels),
      optax.add_decayed_weights(train_cfg.weight_decay),
      optax.multi_transform({"backbone": optimizer(train_cfg.backbone_lr_mult),
                             "new": optimizer(1.0)}, lr_labels))


def create_train_state(config, model, tx, num_classes: int, rng) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  variables = init_variables(model, init_rng, config.data.height, config.data.width)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  if config.model.get("pretrained"):
    from jaxreid.convert import load_pretrained_backbone
    bb_params, bb_stats = load_pretrained_backbone(config.model.pretrained, config.model)
    params = _replace_subtree(params, ("encoder", "backbone"), bb_params)
    if bb_stats:
      batch_stats = _replace_subtree(batch_stats, ("encoder", "backbone"), bb_stats)
  memory = {}
  if config.train.loss == "memory":
    h, w = feature_map_size(config.model, config.data.height, config.data.width)
    memory = class_memory.init_class_memory(num_classes, (h, w, config.model.neck))
  elif config.train.loss == "embedding":
    dim = params["head"]["bottleneck"]["scale"].shape[0]
    memory = {"centers": jax.random.normal(jax.random.fold_in(init_rng, 1), (num_classes, dim))}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=tx.init(params),
                    memory=memory, rng=state_rng)


def _replace_subtree(tree: dict, path: tuple[str, ...], new) -> dict:
  """A copy of `tree` with tree[path] replaced by `new` (shapes must agree)."""
  old = tree
  for key in path:
    old = old[key]
  if jax.tree.structure(old) != jax.tree.structure(new):
    raise ValueError(f"model.pretrained does not fit {'/'.join(path)}: parameter names differ.")
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    if a.shape != b.shape:
      raise ValueError(f"model.pretrained does not fit {'/'.join(path)}: shape {b.shape} where "
                       f"the model has {a.shape}.")
  out = dict(tree)
  out[path[0]] = _replace_subtree(tree[path[0]], path[1:], new) if len(path) > 1 else new
  return out


def make_train_step(model, tx, train_cfg):
  """(state, batch) → (state, metrics); batch = {"image" uint8 [B,H,W,3], "label" int32 [B]}."""
  if train_cfg.loss not in LOSSES:
    raise ValueError(f"train.loss={train_cfg.loss!r} is unknown; use one of {LOSSES}.")

  def loss_fn(params, state, batch):
    variables = {"params": params, "batch_stats": state.batch_stats}
    if train_cfg.loss == "embedding":
      return embedding_loss(variables, state, batch)
    maps, upd = model.apply(variables, batch["image"], train=True, method="encode",
                            mutable=["batch_stats"])
    variables = {"params": params, "batch_stats": upd["batch_stats"]}
    labels = batch["label"]
    if train_cfg.loss == "memory":
      gallery = jax.lax.stop_gradient(state.memory["features"])
      logits, upd = model.apply(variables, maps, gallery, train=True, method="match",
                                mutable=["batch_stats"])
      loss = losses.focal_memory_loss(logits, labels, state.memory["valid"],
                                      train_cfg.focal_gamma)
      acc = jnp.mean(jnp.argmax(jnp.where(state.memory["valid"], logits, -jnp.inf), 1) == labels)
    else:
      logits, upd = model.apply(variables, maps, maps, train=True, method="match",
                                mutable=["batch_stats"])
      if train_cfg.loss == "pairwise":
        loss = losses.pairwise_bce_loss(logits, labels)
      else:
        loss = losses.triplet_score_loss(logits, labels, train_cfg.triplet_margin)
      acc = losses.pair_accuracy(logits, labels)
    return loss, (upd["batch_stats"], jax.lax.stop_gradient(maps), acc)

  def embedding_loss(variables, state, batch):
    """Label-smoothed CE on the classifier + `triplet_weight`·batch-hard triplet and
    `center_weight`·center loss on the pre-BN vectors (NFormer stage 1 / reid-strong-baseline)."""
    (features, logits), upd = model.apply(variables, batch["image"], method="train_outputs",
                                          mutable=["batch_stats"])
    labels = batch["label"]
    loss = (losses.cross_entropy_label_smooth(logits, labels, train_cfg.label_smoothing)
            + train_cfg.triplet_weight * losses.batch_hard_triplet_loss(
                features, labels, train_cfg.triplet_margin)
            + train_cfg.center_weight * losses.center_loss(features, labels,
                                                           state.memory["centers"]))
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (upd["batch_stats"], jax.lax.stop_gradient(features), acc)

  def train_step(state: TrainState, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (batch_stats, maps, acc)), grads = grad_fn(state.params, state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    memory = state.memory
    if train_cfg.loss == "memory":
      memory = class_memory.overwrite(memory, maps, batch["label"])
    elif train_cfg.loss == "embedding":  # centres: plain SGD on the unweighted center loss
      center_grad = jax.grad(losses.center_loss, argnums=2)(maps, batch["label"],
                                                            memory["centers"])
      memory = {"centers": memory["centers"] - train_cfg.center_lr * center_grad}
    metrics = {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, memory=memory)
    return new_state, metrics

  return train_step


def make_sampler(config, train_split):
  d = config.data
  cls = {"gs": samplers.GraphSampler, "pk": samplers.PKSampler,
         "random": samplers.RandomSampler}.get(d.sampler)
  if cls is None:
    raise ValueError(f"data.sampler={d.sampler!r} is unknown; use 'gs', 'pk' or 'random'.")
  return cls(train_split.labels, batch_size=d.batch_size, num_instances=d.num_instances,
             seed=config.seed)


def epoch_plan(config, sampler, model, state, train_split, mesh, epoch: int) -> np.ndarray:
  """The batches of one epoch; the graph sampler first scores one image per class."""
  if not isinstance(sampler, samplers.GraphSampler):
    return sampler.epoch_plan(epoch)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  reps = sampler.representatives(epoch)
  maps = extract(model, variables, train_split, config, mesh, indices=reps,
                 desc=f"graph sampler, epoch {epoch + 1}")
  scores = score_matrix(match_fn(model), variables, maps, maps, tile_p=config.eval.tile_p,
                        tile_g=config.eval.tile_g, mesh=mesh)
  return sampler.epoch_plan(epoch, -scores)


def train_and_evaluate(config, workdir: str, mesh=None) -> dict:
  """Trains `config` in `workdir` (resuming from its last checkpoint) and evaluates the result.

  `mesh` defaults to all devices. Returns the final results dict (also written to
  `workdir/results.json`); {} when stopped early by `train.stop_at_step`.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log = _file_logger(workdir)
  (workdir / "config.json").write_text(config.to_json(indent=2))
  mesh = mesh or parallel.make_mesh()
  parallel.check_divisible(config.data.batch_size, mesh, "data.batch_size")
  train_split = datasets.load_train(config.dataset.train, data_dir=config.dataset.data_dir,
                                    manual_dir=config.dataset.manual_dir)
  if is_embedding(config.model) and not config.model.get("num_classes"):
    with config.unlocked():  # the classifier covers the training ids; saved with the config
      config.model.num_classes = train_split.num_classes
    (workdir / "config.json").write_text(config.to_json(indent=2))
  model = build_model(config)
  sampler = make_sampler(config, train_split)
  n_steps = sampler.num_batches
  tx = make_optimizer(config.train, n_steps)
  state = create_train_state(config, model, tx, train_split.num_classes,
                             jax.random.key(config.seed))
  state = parallel.replicate(state, mesh)
  ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
  start_epoch, start_batch, plan = 0, 0, None
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, data_state = restored
    start_epoch, start_batch = int(data_state["epoch"]), int(data_state["batch"])
    plan = data_state["plan"] if start_batch > 0 else None
    log.info("resumed from step %d (epoch %d, batch %d)", int(state.step), start_epoch + 1,
             start_batch)
  train_step = parallel.jit_train_step(make_train_step(model, tx, config.train), mesh)
  writer = _summary_writer(workdir)
  stop_at = config.train.get("stop_at_step")
  total = config.train.epochs * n_steps
  results = {}
  try:
    for epoch in range(start_epoch, config.train.epochs):
      if plan is None:
        plan = epoch_plan(config, sampler, model, state, train_split, mesh, epoch)
      batches = pipeline.train_batches(
          train_split, plan, slots=parallel.process_slice(plan.shape[1]), epoch=epoch, start_batch=start_batch, seed=config.seed,
          height=config.data.height, width=config.data.width,
          augment=config.data.augment.to_dict() if config.data.augment else None,
          num_threads=config.data.num_threads)
      bar = tqdm(batches, total=len(plan) - start_batch, desc=f"epoch {epoch + 1}/"
                 f"{config.train.epochs}", leave=False, dynamic_ncols=True)
      t0 = time.time()
      for b, batch in enumerate(bar, start=start_batch):
        batch = parallel.shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
        state, metrics = train_step(state, batch)
        step = int(state.step)
        if step % config.train.log_every_steps == 0 or b == len(plan) - 1:
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.3f}")
          for k, v in m.items():
            writer.add_scalar(f"train/{k}", v, step)
          writer.add_scalar("train/steps_per_s", (b + 1 - start_batch) / (time.time() - t0), step)
          log.info("step %d/%d epoch %d: %s", step, total, epoch + 1,
                   " ".join(f"{k}={v:.4f}" for k, v in m.items()))
        if step % config.train.checkpoint_every_steps == 0:
          ckpt.save(state, {"epoch": epoch, "batch": b + 1, "plan": plan}, config)
        if stop_at is not None and step >= stop_at:
          ckpt.save(state, {"epoch": epoch, "batch": b + 1, "plan": plan}, config, force=True)
          log.info("stopped at step %d (train.stop_at_step); rerun to resume", step)
          return {}
      bar.close()
      start_batch, plan = 0, None
      ckpt.save(state, {"epoch": epoch + 1, "batch": 0, "plan": np.full((1, 1), -1)},
                config, force=True)
      every = config.train.eval_every_epochs
      if epoch + 1 == config.train.epochs or (every and (epoch + 1) % every == 0):
        results = evaluate_matcher(config, model, {"params": state.params,
                                                   "batch_stats": state.batch_stats}, mesh,
                                   workdir=workdir)
        for name, r in results["test"].items():
          for k in ("mAP", "R1"):
            writer.add_scalar(f"eval/{name}/{k}", r[k], int(state.step))
        first = next(iter(results["test"].values()))
        ckpt.save_best(state, config, first)
        log.info("epoch %d eval: %s", epoch + 1, json.dumps(results["test"]))
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  results["step"] = int(state.step)
  write_results(workdir, results)
  return results


def _file_logger(workdir: Path) -> logging.Logger:
  log = logging.getLogger(f"jaxreid.{workdir.absolute()}")
  if not log.handlers:
    handler = logging.FileHandler(workdir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
  return log


def _summary_writer(workdir: Path):
  from tensorboardX import SummaryWriter
  if jax.process_index() != 0:
    return _NullWriter()
  return SummaryWriter(str(workdir / "tensorboard"))


class _NullWriter:
  def add_scalar(self, *args, **kwargs):
    pass

  def close(self):
    pass
