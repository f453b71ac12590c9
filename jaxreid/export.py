"""Export for serving: a model's `encode` and `match` as serialized StableHLO (jax.export) next to
its variables, and a loader that runs them without jaxreid's model code.

    python main.py --config configs/qaconv_gs.py --mode=export --checkpoint=runs/market
    served = jaxreid.export.load_exported("runs/market/export")   # imports no model code
    scores = served.match(served.encode(query_images), served.encode(gallery_images))

Files: encode.stablehlo (images float32 [b, h, w, 3] in [0, 1] → features [b, ...]),
match.stablehlo (probe [p, ...], gallery [g, ...] → logits [p, g]), both with symbolic batch
dimensions, their first argument the variables; variables.msgpack (flax.serialization);
meta.json (method, input size, feature shape, platforms).
"""
import json
from pathlib import Path

import jax
import numpy as np
from flax import serialization

PLATFORMS = ("cpu", "cuda", "tpu")
ENCODE, MATCH, VARIABLES, META = ("encode.stablehlo", "match.stablehlo", "variables.msgpack",
                                  "meta.json")


def export_model(model, out_dir, *, platforms=None) -> dict:
  """Writes the files above for a loaded `jaxreid.ReidModel` into `out_dir`; returns the meta.

  `match` scores one gallery entry at a time under `vmap` (every method's matcher handles a
  gallery of one), so both its batch dimensions are symbolic. `platforms`: what the export runs
  on (default: CPU, CUDA and TPU, or only this machine's platform if a model cannot be lowered
  for all three).
  """
  from jax import export
  if platforms is None:
    try:
      return export_model(model, out_dir, platforms=PLATFORMS)
    except Exception:  # noqa: BLE001 (an op without a lowering on some platform)
      return export_model(model, out_dir, platforms=(export.default_export_platform(),))
  module = model.module
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  variables = _plain(model.variables)
  spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  h, w = model.input_size
  b, p, g = export.symbolic_shape("b, p, g")

  def encode(v, images):
    return module.apply(v, images, method="encode")

  def match(v, probe, gallery):
    one = lambda item: module.apply(v, probe, item[None], method="match")[:, 0]
    return jax.vmap(one, out_axes=1)(gallery)

  struct = jax.ShapeDtypeStruct
  encoded = export.export(jax.jit(encode), platforms=platforms)(
      spec, struct((b, h, w, 3), np.float32))
  feature = encoded.out_avals[0]
  matched = export.export(jax.jit(match), platforms=platforms)(
      spec, struct((p, *feature.shape[1:]), feature.dtype),
      struct((g, *feature.shape[1:]), feature.dtype))
  (out / ENCODE).write_bytes(encoded.serialize())
  (out / MATCH).write_bytes(matched.serialize())
  (out / VARIABLES).write_bytes(serialization.msgpack_serialize(_plain(variables)))
  meta = {"method": model.config.model.name, "input_size": [h, w],
          "feature_shape": [int(d) for d in feature.shape[1:]],
          "feature_dtype": str(np.dtype(feature.dtype)), "platforms": list(platforms),
          "jax_version": jax.__version__}
  (out / META).write_text(json.dumps(meta, indent=2))
  return meta


def _plain(tree):
  """Nested plain dicts of numpy arrays (the tree the exported functions take)."""
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return np.asarray(tree)


class Exported:
  """What `load_exported` gives: `encode(images)` → features, `match(probe, gallery)` → logits
  [P, G] (numpy), and `meta` (meta.json). Images are encoded `batch_size` at a time, gallery
  entries matched `gallery_tile` at a time."""

  def __init__(self, encode, match, variables, meta, gallery_tile: int = 64,
               batch_size: int = 64):
    self.meta = meta
    self.input_size = tuple(meta["input_size"])
    self.gallery_tile = int(gallery_tile)
    self.batch_size = int(batch_size)
    self._variables = variables
    self._encode = jax.jit(encode.call)
    self._match = jax.jit(match.call)

  def encode(self, images) -> np.ndarray:
    """Features of NHWC RGB images (uint8, or float in [0, 1]) of the exported input size."""
    images = np.asarray(images)
    h, w = self.input_size
    if images.ndim != 4 or images.shape[1:] != (h, w, 3):
      raise ValueError(f"expected images [B, {h}, {w}, 3]; got shape {images.shape}.")
    images = (images.astype(np.float32) / np.float32(255.0) if images.dtype == np.uint8
              else images.astype(np.float32))
    size = self.batch_size
    return np.concatenate([np.asarray(self._encode(self._variables, images[i:i + size]))
                           for i in range(0, len(images), size)])

  def match(self, probe, gallery) -> np.ndarray:
    """Logits [P, G] (higher = more similar) of features from `encode`."""
    probe, gallery = np.asarray(probe), np.asarray(gallery)
    shape = tuple(self.meta["feature_shape"])
    for name, x in (("probe", probe), ("gallery", gallery)):
      if x.shape[1:] != shape:
        raise ValueError(f"{name} must be features [N, {', '.join(map(str, shape))}]; got shape "
                         f"{x.shape}.")
    tiles = [self._match(self._variables, probe, gallery[i:i + self.gallery_tile])
             for i in range(0, len(gallery), self.gallery_tile)]
    return np.concatenate([np.asarray(t) for t in tiles], axis=1)


def load_exported(directory, *, gallery_tile: int = 64, batch_size: int = 64) -> Exported:
  """The exported model in `directory` (what --mode=export wrote), runnable without jaxreid's
  model code (only jax, numpy and flax.serialization are used)."""
  from jax import export
  d = Path(directory)
  missing = [f for f in (ENCODE, MATCH, VARIABLES, META) if not (d / f).is_file()]
  if missing:
    raise FileNotFoundError(f"{d} is not an exported model: {', '.join(missing)} missing; write "
                            "one with --mode=export.")
  encode = export.deserialize(bytearray((d / ENCODE).read_bytes()))
  match = export.deserialize(bytearray((d / MATCH).read_bytes()))
  variables = jax.device_put(serialization.msgpack_restore((d / VARIABLES).read_bytes()))
  return Exported(encode, match, variables, json.loads((d / META).read_text()),
                  gallery_tile=gallery_tile, batch_size=batch_size)
