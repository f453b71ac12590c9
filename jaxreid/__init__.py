"""jaxreid: person re-identification in JAX/Flax.

`load(method_or_config, checkpoint)` gives a `ReidModel` (encode images, match feature maps);
`evaluate_ranking(scores, query_ids, gallery_ids, query_cams, gallery_cams)` gives CMC/mAP/mINP;
`rerank` (k-reciprocal re-ranking) and `tlift` (temporal lifting) post-process a score matrix.
"""
from jaxreid.api import ReidModel, load
from jaxreid.eval.metrics import evaluate_ranking, top_k
from jaxreid.eval.rerank import rerank
from jaxreid.eval.tlift import tlift

__all__ = ["ReidModel", "evaluate_ranking", "load", "rerank", "tlift", "top_k"]
