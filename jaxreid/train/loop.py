"""The one training loop.

`run(task, …)` trains any `Task`: a train state, a pure step (state, batch) → (state, metrics),
and per epoch a batch plan (saved in checkpoints, so a resumed run continues mid-epoch with the
same batches) and the host batches it gives; it logs, checkpoints, resumes, honours
`stop_at_step`, and calls the task's evaluation. `train_and_evaluate` builds the task of an
image model trained by one of its method's objectives, with batches from the sampler of
`data.sampler` (`data.samplers.Sampler`); a method's later stage builds its own task.
"""
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxreid import backbones, parallel
from jaxreid.checkpoint import Checkpointer, has_checkpoint
from jaxreid.data import datasets, pipeline, samplers
from jaxreid.eval.evaluator import (eval_settings, evaluate_matcher, extract, match_fn,
                                    write_results)
from jaxreid.eval.scoring import score_matrix
from jaxreid.models import init_variables
from jaxreid.objectives import Objective
from jaxreid.train import preflight
from jaxreid.train import schedule as schedules
from jaxreid.train.optim import learning_rates, make_optimizer
from jaxreid.train.state import TrainState


class Task(NamedTuple):
  """One training run for `run`.

  plan(epoch, state) → the epoch's plan, an array whose rows are its batches;
  batches(plan, epoch, start_batch) → host batches for plan rows start_batch…;
  evaluate(state) → results {"test": {name: metrics}, …}, called after the epochs
  `eval_every_epochs` picks and after the last one (None: never).
  schedule: None, or an epoch schedule decided by the loss (train/schedule.py):
  end_epoch(epoch, mean loss of the epoch, state) → state after every epoch, and training stops
  after epoch `schedule.final_epochs` (at most `epochs`);
  stateful: {name: object} whose state_dict() / load_state_dict(dict) of NumPy arrays is saved in
  every checkpoint's data state (a sampler's pointers); the schedule's is saved as "schedule".
  learning_rates(state) → {parameter group: lr of the step just taken}, computed on the host and
  logged to TensorBoard as train/lr/<group> (None: not logged).
  """
  name: str                      # log / TensorBoard prefix ("" for the main model)
  state: TrainState
  step: Callable                 # pure (state, batch) → (state, metrics)
  epochs: int
  plan: Callable[[int, TrainState], np.ndarray]
  batches: Callable[[np.ndarray, int, int], Iterator[dict]]
  evaluate: Callable[[TrainState], dict] | None
  config: Any                    # saved with every checkpoint
  checkpoint_dir: Path
  mesh: Any                      # state replicated, batches sharded on their first axis
  log_every_steps: int = 10
  checkpoint_every_steps: int = 1000
  keep_checkpoints: int = 2
  eval_every_epochs: int = 0
  stop_at_step: int | None = None
  schedule: Any = None
  stateful: dict | None = None
  learning_rates: Callable[[TrainState], dict[str, float]] | None = None


def make_train_step(model, tx, objective: Objective, train_cfg):
  """(state, batch) → (state, metrics): the objective's loss and gradients, the optimiser
  update, then the objective's memory update; batch = {"image" uint8 [B,H,W,3], "label" [B],
  "augment": the slots' augmentation factors, applied here (pipeline.train_batches)}."""

  def loss_fn(params, state, batch):
    variables = {"params": params, "batch_stats": state.batch_stats}
    return objective.loss(model, variables, state, batch, train_cfg)

  def train_step(state: TrainState, batch):
    batch = pipeline.augmented(batch)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (batch_stats, aux, metrics)), grads = grad_fn(state.params, state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    memory = objective.update_memory(state.memory, aux, batch, train_cfg)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params)}   # of the new parameters: saved next
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, memory=memory)
    return new_state, metrics

  return train_step


def create_train_state(config, model, tx, objective: Objective, num_classes: int,
                       num_images: int, rng) -> TrainState:
  """Initial state: fresh variables (the backbone from model.pretrained when set), the
  optimiser state and the objective's memory (for `num_classes` ids in `num_images` training
  images)."""
  init_rng, state_rng = jax.random.split(rng)
  variables = init_variables(model, init_rng, config.data.height, config.data.width)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  if config.model.get("pretrained"):
    bb_params, bb_stats = backbones.get(config.model).load_pretrained(config.model.pretrained,
                                                                      config.model)
    params = _replace_subtree(params, ("encoder", "backbone"), bb_params)
    if bb_stats:
      batch_stats = _replace_subtree(batch_stats, ("encoder", "backbone"), bb_stats)
  memory = objective.init_memory(config, params, num_classes, num_images, init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=tx.init(params),
                    memory=memory, rng=state_rng)


def fill_from_train_split(config, train_split) -> None:
  """Sets model.num_classes (the classifier's width) from the training split when the config
  leaves it 0; it is saved with the config."""
  if "num_classes" in config.model and not config.model.num_classes:
    with config.unlocked():
      config.model.num_classes = train_split.num_classes


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


def epoch_plan(config, sampler: samplers.Sampler, model, state, train_split, mesh,
               epoch: int) -> np.ndarray:
  """The batches of one epoch (`sampler.plan`); the scores a sampler asks for are those of the
  model in `state` between the training images it names, extracted and matched as in
  evaluation."""

  def score(indices):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    maps = extract(model, variables, train_split, config, mesh, indices=indices,
                   desc=f"sampler scores, epoch {epoch + 1}")
    return np.asarray(score_matrix(match_fn(model), variables, maps, maps,
                                   tile_p=config.eval.tile_p, tile_g=config.eval.tile_g,
                                   mesh=mesh), np.float32)

  return sampler.plan(epoch, score)


def run(task: Task, log: logging.Logger, writer) -> tuple[dict | None, TrainState]:
  """Trains `task` from its last checkpoint in task.checkpoint_dir to the end of its epochs.

  Returns (results of the last evaluation or {}, final state); (None, state) when stopped by
  `stop_at_step` (checkpointed: rerun to resume).
  """
  prefix = f"{task.name} " if task.name else ""
  tag = f"{task.name}/" if task.name else ""
  state = parallel.replicate(task.state, task.mesh)
  ckpt = Checkpointer(task.checkpoint_dir, keep=task.keep_checkpoints)
  start_epoch, start_batch, plan = 0, 0, None
  components = dict(task.stateful or {})
  if task.schedule is not None:
    components["schedule"] = task.schedule
  loss_sum, loss_count = 0.0, 0     # of the current epoch, for the schedule and the log
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, data_state = restored
    start_epoch, start_batch = int(data_state["epoch"]), int(data_state["batch"])
    plan = data_state.get("plan") if start_batch > 0 else None   # None: task.plan draws it again
    if start_batch > 0 and "loss_sum" in data_state:
      loss_sum, loss_count = float(data_state["loss_sum"]), int(data_state["loss_count"])
    for name, obj in components.items():
      saved = {k[len(name) + 1:]: v for k, v in data_state.items() if k.startswith(name + ".")}
      if saved:
        obj.load_state_dict(saved)
    log.info("%sresumed from step %d (epoch %d, batch %d)", prefix, int(state.step),
             start_epoch + 1, start_batch)
  step_fn = parallel.jit_train_step(task.step, task.mesh)
  results = {}
  signals = SignalGuard()
  first_losses = []   # the first logged loss, the reference of the explosion warning

  def data_state_of(epoch, batch, plan):
    out = {"epoch": epoch, "batch": batch, "plan": plan, "loss_sum": float(loss_sum),
           "loss_count": loss_count}
    for name, obj in components.items():
      out.update({f"{name}.{k}": v for k, v in obj.state_dict().items()})
    return out

  try:
    signals.install()
    for epoch in range(start_epoch, task.epochs):
      if task.schedule is not None and epoch >= task.schedule.final_epochs:
        break
      if plan is None:
        plan = task.plan(epoch, state)
      total = task.epochs * len(plan)
      bar = tqdm(task.batches(plan, epoch, start_batch), total=len(plan) - start_batch,
                 desc=f"{prefix}epoch {epoch + 1}/{task.epochs}", leave=False,
                 dynamic_ncols=True)
      t0 = time.time()
      signals.defer(True)
      for b, batch in enumerate(bar, start=start_batch):
        state, metrics = step_fn(state, parallel.shard_batch(batch, task.mesh))
        loss_sum, loss_count = loss_sum + metrics["loss"], loss_count + 1
        step = int(state.step)
        save_now = step % task.checkpoint_every_steps == 0
        stop_now = task.stop_at_step is not None and step >= task.stop_at_step
        signalled = signals.received is not None
        if step % task.log_every_steps == 0 or b == len(plan) - 1 or save_now or stop_now:
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          check_divergence(m, step, prefix, log, first_losses, bool(ckpt.last.all_steps()))
          bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.3f}")
          for k, v in m.items():
            writer.add_scalar(f"{tag}train/{k}", v, step)
          writer.add_scalar(f"{tag}train/steps_per_s", (b + 1 - start_batch) / (time.time() - t0),
                            step)
          for group, lr in (task.learning_rates(state) if task.learning_rates else {}).items():
            writer.add_scalar(f"{tag}train/lr/{group}", lr, step)
          log.info("%sstep %d/%d epoch %d: %s", prefix, step, total, epoch + 1,
                   " ".join(f"{k}={v:.4f}" for k, v in m.items()))
        if save_now or stop_now or signalled:
          with signals.held():
            ckpt.save(state, data_state_of(epoch, b + 1, plan), task.config,
                      force=stop_now or signalled)
            if signalled:
              ckpt.wait()
        if signalled:
          log.info("%s%s at step %d; checkpoint saved", prefix, signals.name, step)
          raise TrainingInterrupted(signals.received, f"{prefix}{signals.name} received: stopped "
                                    f"at step {step} with a checkpoint; rerun the same command "
                                    "to resume")
        if stop_now:
          log.info("%sstopped at step %d (stop_at_step); rerun to resume", prefix, step)
          return None, state
      bar.close()
      check_divergence({"loss": float(loss_sum)}, int(state.step), prefix, log, first_losses,
                       bool(ckpt.last.all_steps()))
      last_epoch = task.epochs
      if loss_count:
        mean_loss = float(loss_sum) / loss_count
        writer.add_scalar(f"{tag}train/epoch_loss", mean_loss, int(state.step))
        if task.schedule is not None:
          state = task.schedule.end_epoch(epoch, mean_loss, state)
          last_epoch = min(task.epochs, task.schedule.final_epochs)
          log.info("%sepoch %d: mean loss %.4f; %s", prefix, epoch + 1, mean_loss,
                   task.schedule.describe())
      start_batch, plan, loss_sum, loss_count = 0, None, 0.0, 0
      with signals.held():
        ckpt.save(state, data_state_of(epoch + 1, 0, np.full((1, 1), -1)), task.config,
                  force=True)
      signals.defer(False)     # raises now for a signal received since the last step
      every = task.eval_every_epochs
      if task.evaluate is not None and (epoch + 1 == last_epoch
                                        or (every and (epoch + 1) % every == 0)):
        results = task.evaluate(state)
        for name, r in results["test"].items():
          for k in ("mAP", "R1"):
            writer.add_scalar(f"{tag}eval/{name}/{k}", r[k], int(state.step))
        with signals.held():
          ckpt.save_best(state, task.config, next(iter(results["test"].values())))
        log.info("%sepoch %d eval: %s", prefix, epoch + 1, json.dumps(results["test"]))
  finally:
    try:
      with signals.held():
        clean_up(ckpt.wait, ckpt.close)
    finally:
      signals.uninstall()
  return results, state


def clean_up(*steps: Callable[[], Any]) -> None:
  """Runs every step of a `finally` block. While an error is already propagating, a step that
  fails (a full disk again, a closed event loop) is logged and never replaces that error;
  otherwise the first failure is raised after all steps ran."""
  propagating = sys.exc_info()[1] is not None
  first = None
  for step in steps:
    try:
      step()
    except Exception as e:  # noqa: BLE001 - whatever a cleanup raises
      if propagating:   # the error that stopped the run is the one reported
        logging.getLogger(__name__).info("while stopping, %s failed: %s",
                                         getattr(step, "__qualname__", step), e)
      elif first is None:
        first = e
  if first is not None:
    raise first


class TrainingInterrupted(KeyboardInterrupt):
  """SIGTERM or SIGINT stopped the run after saving a checkpoint; rerunning resumes it."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


# What a stop at once does instead of raising TrainingInterrupted, (signum, message) → None: the
# command line ends the process there (no cleanup to wait for, nothing for a raise landing in a
# finalizer to lose).
STOP_AT_ONCE: Callable[[int, str], None] | None = None


class SignalGuard:
  """SIGTERM and SIGINT during `run`. While deferred (the step loop up to the epoch's
  checkpoint), a first signal only sets `received`: the current step ends, and `run` saves a
  checkpoint and raises TrainingInterrupted. Elsewhere (the epoch's plan, evaluation), and for
  a second signal, the run stops at once, except inside a checkpoint write (`held`), which a
  signal never cuts short: the stop comes when the write is done. Stopping at once raises
  TrainingInterrupted, or calls STOP_AT_ONCE(signum, message) when set. Only in the main
  thread (Python delivers signals there)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received, self._previous = None, {}
    self._deferring = self._holding = self._pending = False

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def uninstall(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def defer(self, on: bool) -> None:
    """While on, a first signal only sets `received` (the loop saves and stops after the
    step); turning it off raises for a signal received meanwhile (checkpoint already saved)."""
    self._deferring = on
    if not on and self.received is not None:
      self.uninstall()
      raise TrainingInterrupted(self.received, f"{self.name} received: stopped after the "
                                "epoch's checkpoint; rerun the same command to resume")

  @contextlib.contextmanager
  def held(self):
    """A section no signal interrupts (a checkpoint write): a stop asked for meanwhile comes
    at its end."""
    self._holding = True
    try:
      yield
    finally:
      self._holding = False
    if self._pending:
      self._stop()

  def _handle(self, signum, frame):
    del frame
    first = self.received is None
    self.received = signum
    if first and self._deferring:
      return
    if self._holding:
      self._pending = True
      return
    self._stop()

  def _stop(self):
    message = (f"{self.name} received: stopped; rerun the same command to resume from the last "
               "checkpoint")
    if STOP_AT_ONCE is not None:
      STOP_AT_ONCE(self.received, message)
    self.uninstall()
    raise TrainingInterrupted(self.received, message)


class TrainingDiverged(ValueError):
  """A non-finite loss or gradient: training stops before anything is saved from it."""


EXPLOSION_FACTOR = 1e4   # a loss this many times the first logged one is warned about (once)


def check_divergence(metrics: dict, step: int, prefix: str, log, first_losses: list,
                     saved: bool = True) -> None:
  """Raises TrainingDiverged for a non-finite loss, gradient norm or norm of the updated
  parameters (called before the step's checkpoint, so the last checkpoint stays the last good
  one; `saved`: whether there is one); warns once when the loss grows past EXPLOSION_FACTOR ×
  the first logged loss."""
  for name in ("loss", "grad_norm", "param_norm"):
    value = metrics.get(name)
    if value is not None and not np.isfinite(value):
      kept = ("the last checkpoint before it is kept" if saved else
              "nothing was saved (no checkpoint before it)")
      raise TrainingDiverged(f"{prefix}training diverged at step {step}: {name} {value}; {kept}; "
                             "lower train.lr or set train.clip_norm")
  loss = metrics["loss"]
  if not first_losses:
    first_losses.append(abs(loss))
  elif first_losses[0] > 0 and abs(loss) > EXPLOSION_FACTOR * first_losses[0] and len(
      first_losses) == 1:
    first_losses.append(abs(loss))
    message = (f"{prefix}loss {loss:.4g} at step {step} is over {EXPLOSION_FACTOR:g}x the first "
               f"logged loss {first_losses[0]:.4g}; training may be diverging")
    log.warning(message)
    print(f"warning: {message}", file=sys.stderr)


def train_and_evaluate(config, workdir: str, method, mesh=None, *,
                       resumable: tuple[str, ...] = ()) -> dict:
  """Trains the image model of `config` with `method`'s objective `train.loss` in `workdir`
  (resuming from its last checkpoint) and evaluates the result.

  `method`: the registry entry (its `build` and `objectives`); `mesh` defaults to all devices;
  `resumable`: config fields a resume may change besides `preflight.RESUMABLE` (a later stage's
  own section).
  Returns the final results dict (also written to `workdir/results.json`); {} when stopped
  early by `train.stop_at_step`.
  """
  workdir = Path(workdir)
  objective = method.objectives.get(config.train.loss)
  if objective is None:
    raise ValueError(f"train.loss={config.train.loss!r} is not an objective of "
                     f"{method.name}; use one of {sorted(method.objectives)}.")
  preflight.validate(config, method.kind)
  mesh = mesh or parallel.make_mesh()
  parallel.check_divisible(config.data.batch_size, mesh, "data.batch_size")
  parallel.check_divisible(config.eval.batch_size, mesh, "eval.batch_size")
  preflight.check_workdir(workdir, config, config.get("method") or method.name, resumable)
  datasets.resolve(config)
  train_split = datasets.load_train(config.dataset.train, data_dir=config.dataset.data_dir,
                                    manual_dir=config.dataset.manual_dir)
  fill_from_train_split(config, train_split)
  workdir.mkdir(parents=True, exist_ok=True)
  log = file_logger(workdir)
  (workdir / "config.json").write_text(config.to_json(indent=2))
  model = method.build(config)
  sampler = samplers.make_sampler(config, train_split)
  steps_per_epoch = sampler.epoch_lengths(config.train.epochs)
  tx = make_optimizer(config.train, steps_per_epoch)
  state = create_train_state(config, model, tx, objective, train_split.num_classes,
                             len(train_split.labels), jax.random.key(config.seed))
  train_step = make_train_step(model, tx, objective, config.train)
  preflight.check_step_fields(train_step, state, config)
  if objective.prepare is not None and not has_checkpoint(workdir):
    state = objective.prepare(config, state, train_split, mesh, log)
  d, t = config.data, config.train

  def batches(plan, epoch, start_batch):
    return pipeline.train_batches(
        train_split, plan, slots=parallel.process_slice(plan.shape[1]), epoch=epoch,
        start_batch=start_batch, seed=config.seed, height=d.height, width=d.width,
        augment=d.augment.to_dict() if d.augment else None, num_threads=d.num_threads,
        num_workers=d.get("num_workers", 0), resize=d.get("resize", "bicubic"))

  def evaluate(state):
    previous = read_results(workdir)
    if previous is not None and (previous.get("step"), previous.get("eval_settings")) == (
        int(state.step), eval_settings(config)):
      log.info("step %d was evaluated with these settings before; results.json is kept",
               int(state.step))
      return previous
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return evaluate_matcher(config, model, variables, mesh, workdir=workdir)

  task = Task(
      name="", state=state, step=train_step, epochs=t.epochs,
      plan=lambda epoch, state: epoch_plan(config, sampler, model, state, train_split, mesh,
                                           epoch),
      batches=batches, evaluate=evaluate, config=config, checkpoint_dir=workdir, mesh=mesh,
      log_every_steps=t.log_every_steps, checkpoint_every_steps=t.checkpoint_every_steps,
      keep_checkpoints=t.keep_checkpoints, eval_every_epochs=t.eval_every_epochs,
      stop_at_step=t.get("stop_at_step"), schedule=schedules.from_config(t),
      stateful={"sampler": sampler},
      learning_rates=lambda state: learning_rates(config.train, steps_per_epoch,
                                                  int(state.step) - 1, state.opt_state))
  writer = summary_writer(workdir)
  try:
    results, state = run(task, log, writer)
  finally:
    clean_up(writer.close)
  if results is None:
    return {}
  if not results:   # every epoch was already done: a rerun of a finished run, evaluated again
    results = evaluate(state)   # unless results.json holds this step under these settings
  results["step"] = int(state.step)
  write_results(workdir, results)
  return results


def read_results(workdir: Path) -> dict | None:
  """The run's results.json when it holds evaluation results, else None."""
  path = Path(workdir) / "results.json"
  try:
    results = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return results if isinstance(results, dict) and results.get("test") else None


class _TrainLogHandler(logging.FileHandler):
  """train.log. A line that cannot be written (a full disk) is dropped without the traceback
  logging prints per failed line: the checkpoint write that follows says what is wrong."""

  def handleError(self, record):
    del record


def file_logger(workdir: Path) -> logging.Logger:
  log = logging.getLogger(f"jaxreid.{workdir.absolute()}")
  if not log.handlers:
    handler = _TrainLogHandler(workdir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
  return log


def summary_writer(workdir: Path):
  if jax.process_index() != 0:
    return _NullWriter()
  return _Summaries(workdir / "tensorboard")


class _Summaries:
  """tensorboardX's SummaryWriter whose failed writes (a full disk) are one sentence naming
  the folder."""

  def __init__(self, directory: Path):
    from tensorboardX import SummaryWriter
    self.directory = directory
    self._writer = SummaryWriter(str(directory))

  def _failed(self, e: OSError) -> OSError:
    return OSError(f"could not write TensorBoard events under {self.directory} "
                   f"({e.strerror or e}); the checkpoints are intact: free disk space, then rerun "
                   "to resume")

  def add_scalar(self, *args, **kwargs):
    try:
      self._writer.add_scalar(*args, **kwargs)
    except OSError as e:
      raise self._failed(e) from None

  def close(self):
    try:
      self._writer.close()
    except OSError as e:
      raise self._failed(e) from None


class _NullWriter:
  def add_scalar(self, *args, **kwargs):
    pass

  def close(self):
    pass
