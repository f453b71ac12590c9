"""Transformer-Cat and Transformer-Cross, the pairwise Transformer baselines of the TransMatcher
paper (Table 2); trained in-batch like TransMatcher. docs/methods/transformer_pairs.md."""
import jax.numpy as jnp

from jaxreid import models, objectives
from jaxreid.methods import Method
from jaxreid.methods.transformer_pairs import model

PAIR_OBJECTIVES = {"pairwise": objectives.PAIRWISE_BCE, "triplet": objectives.PAIRWISE_TRIPLET}


def build_cat(config) -> models.PairwiseModel:
  m = config.model
  if not m.neck:
    raise ValueError("Transformer-Cat needs a neck (model.neck = d > 0).")
  h, w = models.feature_map_size(m, config.data.height, config.data.width)
  fields = models.encoder_fields(config)
  encoder = models.FeatureMapEncoder(**fields, normalize=m.get("normalize", False))
  matcher = model.TransformerCat(h, w, num_layers=m.num_layers, heads=m.heads, ffn=m.ffn,
                                 pos_embed=m.pos_embed, dtype=fields["dtype"],
                                 encoder_init=m.get("encoder_init", "xavier"))
  return models.PairwiseModel(encoder=encoder, matcher=matcher)


def build_cross(config) -> models.PairwiseModel:
  m = config.model
  if not m.neck:
    raise ValueError("Transformer-Cross needs a neck (model.neck = d > 0).")
  h, w = models.feature_map_size(m, config.data.height, config.data.width)
  fields = models.encoder_fields(config)
  encoder = model.ProbeMemoryEncoder(**fields, normalize=m.get("normalize", False),
                                     num_layers=m.num_layers + 1, encoders=m.num_layers,
                                     heads=m.heads, ffn=m.ffn, pos_embed=m.pos_embed,
                                     map_dtype=jnp.dtype(m.get("map_dtype", "float32")),
                                     encoder_init=m.get("encoder_init", "xavier"))
  matcher = model.TransformerCross(h, w, num_layers=m.num_layers, heads=m.heads, ffn=m.ffn,
                                   readout=m.get("readout", "mean"), dtype=fields["dtype"])
  return models.PairwiseModel(encoder=encoder, matcher=matcher)


def _describe(m) -> str:
  return f"d {m.neck}, D {m.ffn}, N {m.num_layers}"


METHODS = (
    Method(name="transformer_cat", kind="pairwise", build=build_cat, objectives=PAIR_OBJECTIVES,
           describe=_describe),
    Method(name="transformer_cross", kind="pairwise", build=build_cross,
           objectives=PAIR_OBJECTIVES, describe=_describe),
)
