"""The train state: everything a step reads and writes, one pytree (checkpointed whole)."""
from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  memory: Any          # an objective's non-parameter state (class memory, centres), or {}
  rng: jax.Array
