"""TransMatcher (NeurIPS 2021): Transformer encoder layers on the feature map
(`models.TransformerMapEncoder`) and the simplified matching decoder; trained in-batch with the
graph sampler like QAConv-GS. docs/methods/transmatcher.md."""
import jax.numpy as jnp
import numpy as np

from jaxreid import models, objectives
from jaxreid.methods import Method
from jaxreid.methods.transmatcher import convert, model


def build(config) -> models.PairwiseModel:
  m = config.model
  if not m.neck:
    raise ValueError("TransMatcher needs a neck (model.neck = d > 0).")
  h, w = models.feature_map_size(m, config.data.height, config.data.width)
  fields = models.encoder_fields(config)
  encoder = models.TransformerMapEncoder(
      **fields, normalize=m.get("normalize", False), num_layers=m.num_layers,
      encoders=m.encoders, heads=m.heads, ffn=m.ffn, pos_embed=m.pos_embed,
      map_dtype=jnp.dtype(m.get("map_dtype", "float32")),
      encoder_init=m.get("encoder_init", "xavier"))
  matcher = model.TransMatcher(h, w, num_layers=m.num_layers, ffn=m.ffn, fc1=m.fc1, bn1=m.bn1,
                               mlp_head1=m.mlp_head1, prior_embed=m.prior_embed,
                               dtype=fields["dtype"])
  return models.PairwiseModel(encoder=encoder, matcher=matcher)


def correspondences(variables, probe, gallery) -> dict:
  """Per decoder layer, with fc1 and the sigmoid(R_n) prior applied as in the decoder."""
  params = variables["params"]["matcher"]
  out = model.correspondences(probe, gallery, params.get("fc1_kernel"), params.get("fc1_bias"),
                              params.get("prior"))
  return {k: np.asarray(v) for k, v in out.items()}


METHOD = Method(
    name="transmatcher", kind="pairwise", build=build,
    objectives={"pairwise": objectives.PAIRWISE_BCE, "triplet": objectives.PAIRWISE_TRIPLET},
    convert=convert.transmatcher_from_official, detect=convert.detect,
    export=convert.transmatcher_to_official,
    correspondences=correspondences,
    describe=lambda m: f"d {m.neck}, D {m.ffn}, N {m.num_layers}")
