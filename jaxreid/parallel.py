"""One data-parallel code path for 1 CPU, forced multi-device CPU, GPU and TPU (pod) slices.

Batches are sharded along their first axis over a 1-D mesh named "data"; the train state is
replicated. Under multi-host, each process feeds its own slice of every global batch.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "data"


def maybe_initialize_distributed(enabled: bool) -> None:
  """`jax.distributed.initialize()` for multi-host runs (coordinator from the environment)."""
  if enabled:
    jax.distributed.initialize()


def make_mesh(devices=None) -> jax.sharding.Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(devices, (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicate(tree, mesh):
  return jax.tree.map(lambda x: put_global(x, replicated(mesh)), tree)


def check_divisible(batch_size: int, mesh, field: str) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"{field}={batch_size} must be a multiple of the number of devices "
                     f"({mesh.size}).")


def process_slice(global_batch_size: int) -> slice:
  """The rows of a global batch that this process loads."""
  per = global_batch_size // jax.process_count()
  start = jax.process_index() * per
  return slice(start, start + per)


def shard_batch(batch: dict, mesh) -> dict:
  """Host arrays → global arrays sharded on the batch axis.

  Single-process: the arrays are the whole batch. Multi-process: each process passes its own
  rows (see `process_slice`).
  """
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def put_global(x, sharding):
  """A host value that every process holds identically → a global array with `sharding`."""
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    return jax.random.wrap_key_data(put_global(jax.random.key_data(x), sharding))
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicated_to_host(x) -> np.ndarray:
  """A replicated global array → NumPy, reading only this process's copy."""
  return np.asarray(x.addressable_data(0))


def jit_train_step(train_step, mesh):
  """jit with the state replicated and the batch sharded; the old state is donated."""
  rep, data = replicated(mesh), batch_sharded(mesh)
  return jax.jit(train_step, in_shardings=(rep, data), out_shardings=(rep, rep),
                 donate_argnums=0)
