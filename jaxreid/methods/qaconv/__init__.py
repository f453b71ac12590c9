"""QAConv (ECCV 2020) and QAConv-GS: the QAConv matcher on the shared feature-map encoder,
trained against a class memory (focal loss) or in-batch (graph sampler; pairwise BCE or
triplet). docs/methods/qaconv.md."""
import numpy as np

from jaxreid import models, objectives
from jaxreid.methods import Method
from jaxreid.methods.qaconv import convert, model, objective


def build(config) -> models.PairwiseModel:
  m = config.model
  h, w = models.feature_map_size(m, config.data.height, config.data.width)
  return models.PairwiseModel(encoder=models.FeatureMapEncoder(**models.encoder_fields(config)),
                              matcher=model.QAConv(h, w, m.head))


def correspondences(variables, probe, gallery) -> dict:
  out = model.correspondences(probe, gallery)
  return {k: np.asarray(v)[None] for k, v in out.items()}     # one matching layer


METHOD = Method(
    name="qaconv", kind="pairwise", build=build,
    objectives={"memory": objective.CLASS_MEMORY, "pairwise": objectives.PAIRWISE_BCE,
                "triplet": objectives.PAIRWISE_TRIPLET},
    convert=convert.qaconv_from_official, detect=convert.detect,
    export=convert.qaconv_to_official, correspondences=correspondences,
    describe=lambda m: f"head {m.head}" + (", neck BN" if m.get("neck_bn", False) else ""))
