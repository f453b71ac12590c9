"""The official pre-fill of PAT's part memory bank (docs/methods/pat.md).

Before epoch 1 the official trainer runs the initial model (ImageNet weights, train mode: random
part regions per batch and drop path; no autocast, so float32; no gradients) over one pass of the
training loader (its sampler and training augmentation) and stores every visited image's
last-layer part tokens in the bank with the bank's own update rule (first visit stores, a repeated
image is blended with momentum). `train.pat.prefill` turns this on (the PAT objective's
`prepare`, set in `__init__`); training then starts from that bank. A resumed run takes its bank from the checkpoint.

The pass draws its own batches: the training sampler and augmentation under the seed
`config.seed + PREFILL_SEED`, and per batch b the keys of `prefill_rngs`.
"""
import time

import jax
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxreid import parallel
from jaxreid.data import pipeline, samplers
from jaxreid.methods.pat.objective import PAT, update_bank
from jaxreid.methods.pat.model import build
from jaxreid.train import loop

PREFILL_SEED = 7907


def prefill_rngs(seed: int, batch: int) -> dict:
  """The drop-path and mask keys of pre-fill batch `batch`."""
  key = jax.random.fold_in(jax.random.key(seed), batch)
  return {"dropout": jax.random.fold_in(key, 0), "mask": jax.random.fold_in(key, 1)}


def fill_bank(model, variables, memory: dict, split, plan: np.ndarray, *, seed: int,
              height: int, width: int, augment: dict | None, momentum: float, mesh=None,
              num_threads: int = 2, num_workers: int = 0, resize: str = "bicubic") -> dict:
  """`memory` after storing the train-mode part tokens of the images of `plan` [nb, B] (rows of
  `split`), batch after batch, each image in batch order (`objective.update_bank`). Images come
  from `pipeline.train_batches(split, plan, epoch=0, seed=seed, …)`; batch b runs under
  `prefill_rngs(seed, b)`. Returns host NumPy arrays."""
  mesh = mesh or parallel.make_mesh()
  rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)

  def step(variables, memory, batch, rngs):
    batch = pipeline.augmented(batch)
    (_, parts, _), _ = model.apply(variables, batch["image"], method="train_outputs",
                                   mutable=["batch_stats"], rngs=rngs)
    return update_bank(memory, parts, batch["index"], batch["label"], momentum)

  fn = jax.jit(step, in_shardings=(rep, rep, data, rep), out_shardings=rep, donate_argnums=1)
  variables = parallel.replicate(variables, mesh)
  memory = parallel.replicate(jax.tree.map(np.array, memory), mesh)
  batches = pipeline.train_batches(split, plan, slots=parallel.process_slice(plan.shape[1]),
                                   epoch=0, seed=seed, height=height, width=width,
                                   augment=augment, num_threads=num_threads, num_workers=num_workers,
                                   resize=resize)
  for b, batch in enumerate(tqdm(batches, total=len(plan), desc="PAT: part memory pre-fill",
                                 leave=False, dynamic_ncols=True)):
    memory = fn(variables, memory, parallel.shard_batch(batch, mesh),
                parallel.replicate(prefill_rngs(seed, b), mesh))
  return jax.tree.map(parallel.replicated_to_host, memory)


def prefilled_memory(config, split, mesh, state=None) -> dict:
  """The bank after the official pre-fill pass of `config`'s initial model: `state` (default:
  the train state the training loop starts from, same seed and model.pretrained)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.bf16 = False                # the official pass runs outside autocast
  c.seed = int(config.seed) + PREFILL_SEED
  model = build(c)
  if state is None:
    state = loop.create_train_state(config, build(config), optax.identity(), PAT,
                                    split.num_classes, len(split.labels),
                                    jax.random.key(config.seed))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  sampler = samplers.make_sampler(c, split)
  plan = loop.epoch_plan(c, sampler, model, state, split, mesh, 0)
  d = config.data
  return fill_bank(model, variables, state.memory, split, plan, seed=c.seed, height=d.height,
                   width=d.width, augment=d.augment.to_dict() if d.augment else None,
                   momentum=float(config.train.pat.memory_momentum), mesh=mesh,
                   num_threads=d.num_threads, num_workers=d.get("num_workers", 0),
                   resize=d.get("resize", "bicubic"))


def prepare(config, state, split, mesh, log):
  """The PAT objective's `prepare`: `state` with the pre-filled bank (a run that does not resume)."""
  t0 = time.time()
  memory = prefilled_memory(config, split, mesh, state)
  log.info("PAT: part memory bank pre-filled with %d of %d training images in %.1f s",
           int(memory["filled"].sum()), len(split.labels), time.time() - t0)
  return state.replace(memory=memory)
