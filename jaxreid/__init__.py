"""jaxreid: person re-identification in JAX/Flax.

`load(method_or_config, checkpoint)` gives a `ReidModel` (encode images, match feature maps);
`evaluate_ranking(scores, query_ids, gallery_ids, query_cams, gallery_cams)` gives CMC/mAP/mINP.
"""
from jaxreid.api import ReidModel, load
from jaxreid.eval.metrics import evaluate_ranking

__all__ = ["ReidModel", "evaluate_ranking", "load"]
