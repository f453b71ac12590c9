"""Optimisers: per-group gradient clipping, L2 weight decay, SGD (nesterov) or Adam on a step
schedule with an optional linear warmup; the backbone (params/encoder/backbone) at
`train.backbone_lr_mult` × the lr."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("sgd", "adam")


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


def lr_schedule(train_cfg, steps_per_epoch):
  """step → lr: ×lr_step_factor at each of lr_step_epochs, after a linear warmup over
  `warmup_epochs` from warmup_factor·lr, the factor updated once per epoch (reid-strong-baseline's
  WarmupMultiStepLR).

  `steps_per_epoch`: an int, or the batches of each epoch (a sequence) when epochs differ in
  length (the identity sampler); steps past the last listed epoch count as later epochs.
  `train.lr_epoch_offset` (default 0) shifts the epoch the schedule sees: 0-based epoch e runs at
  scheduler epoch e + offset. 1 is the official trainer's, which steps WarmupMultiStepLR once in
  its constructor and again at the start of every epoch (docs/methods/embedding.md)."""
  milestones = jnp.asarray(sorted(train_cfg.lr_step_epochs) or [1 << 30])
  warmup = train_cfg.get("warmup_epochs", 0)
  start = train_cfg.get("warmup_factor", 1.0)
  offset = int(train_cfg.get("lr_epoch_offset", 0))
  if isinstance(steps_per_epoch, (int, np.integer)):
    epoch_of = lambda step: step // steps_per_epoch + offset
  else:
    lengths = np.asarray(steps_per_epoch, np.int64)
    if lengths.ndim != 1 or lengths.size == 0 or np.any(lengths < 1):
      raise ValueError("steps_per_epoch must be a positive int or a non-empty sequence of "
                       "positive batch counts.")
    ends = jnp.asarray(np.cumsum(lengths))
    last = int(lengths[-1])
    epoch_of = lambda step: jnp.where(
        step < ends[-1], jnp.searchsorted(ends, step, side="right"),
        len(lengths) + (step - ends[-1]) // last) + offset

  if train_cfg.get("lr_schedule", "step") == "cosine":
    return _cosine_schedule(train_cfg, epoch_of)

  def schedule(step):
    epoch = epoch_of(step)
    decay = train_cfg.lr_step_factor ** jnp.sum(epoch >= milestones)
    if not warmup:
      return train_cfg.lr * decay
    alpha = jnp.minimum(epoch / warmup, 1.0)
    return train_cfg.lr * decay * (start * (1 - alpha) + alpha)

  return schedule


def _bias_leaves(params):
  """True for the leaves whose name ends in "bias"."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: str(getattr(path[-1], "key", path[-1])).endswith("bias"), params)


def _cosine_schedule(train_cfg, epoch_of):
  """`train.lr_schedule = "cosine"` (PAT's official timm CosineLRScheduler, stepped per epoch):
  at scheduler epoch e, init + e·(lr − init)/warmup_epochs while e < warmup_epochs, else
  lr_min + ½(lr − lr_min)(1 + cos(π·e / cosine_epochs)); init = warmup_factor·lr, lr_min =
  cosine_min_factor·lr (docs/methods/pat.md)."""
  lr = train_cfg.lr
  warmup = train_cfg.get("warmup_epochs", 0)
  init = train_cfg.get("warmup_factor", 1.0) * lr
  low = train_cfg.get("cosine_min_factor", 0.0) * lr
  total = train_cfg.get("cosine_epochs", train_cfg.epochs)

  def schedule(step):
    e = jnp.asarray(epoch_of(step), jnp.float32)
    cosine = low + 0.5 * (lr - low) * (1 + jnp.cos(jnp.pi * e / total))
    if not warmup:
      return cosine
    return jnp.where(e < warmup, init + e * (lr - init) / warmup, cosine)

  return schedule


def make_optimizer(train_cfg, steps_per_epoch) -> optax.GradientTransformation:
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
  parts = [
      optax.multi_transform({"features": clip, "head": clip}, clip_labels),
      optax.add_decayed_weights(train_cfg.weight_decay),
      optax.multi_transform({"backbone": optimizer(train_cfg.backbone_lr_mult),
                             "new": optimizer(1.0)}, lr_labels)]
  bias_mult = train_cfg.get("bias_lr_mult", 1.0)
  if bias_mult != 1.0:
    # PAT's BIAS_LR_FACTOR: the final update of every parameter named "*bias" scaled, i.e. its
    # lr (and so its weight-decay step) ×bias_lr_mult (docs/methods/pat.md).
    parts.append(optax.masked(optax.scale(bias_mult), _bias_leaves))
  if train_cfg.get("adaptive_step_factor", 0.0):
    # An lr scale in the optimiser state, set between epochs by the loss-driven schedule
    # (train/schedule.py) and checkpointed with the state; it scales the final update, so it
    # acts exactly as a scaled lr (momentum is accumulated before the lr).
    parts.append(optax.inject_hyperparams(optax.scale)(step_size=1.0))
  return optax.chain(*parts)


def learning_rates(train_cfg, steps_per_epoch, step: int, opt_state=None) -> dict[str, float]:
  """The lr of each parameter group for optimiser step `step` (0-based, as optax counts),
  computed on the host from the schedule for logging: "backbone" and "new" (LR_GROUPS), with
  "backbone_bias" / "new_bias" when train.bias_lr_mult ≠ 1, each times the loss-driven lr scale
  held in `opt_state` (train.adaptive_step_factor)."""
  lr = float(lr_schedule(train_cfg, steps_per_epoch)(step)) * lr_scale(opt_state)
  rates = {"backbone": lr * train_cfg.backbone_lr_mult, "new": lr}
  bias_mult = train_cfg.get("bias_lr_mult", 1.0)
  if bias_mult != 1.0:
    rates.update({f"{group}_bias": rate * bias_mult for group, rate in list(rates.items())})
  return rates


def lr_scale(opt_state) -> float:
  """The loss-driven lr scale in `opt_state` (1 when it has none)."""
  hyperparams = getattr(opt_state[-1], "hyperparams", {}) if opt_state else {}
  return float(jax.device_get(hyperparams["step_size"])) if "step_size" in hyperparams else 1.0


def set_lr_scale(opt_state, scale: float):
  """`opt_state` (of `make_optimizer` with train.adaptive_step_factor) with its lr scale set."""
  last = opt_state[-1]
  if "step_size" not in getattr(last, "hyperparams", {}):
    raise ValueError("This optimiser has no lr scale; build it with train.adaptive_step_factor.")
  old = last.hyperparams["step_size"]
  new = jax.device_put(jnp.asarray(scale, old.dtype), getattr(old, "sharding", None))
  return (*opt_state[:-1], last._replace(hyperparams={**last.hyperparams, "step_size": new}))
