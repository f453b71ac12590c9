"""Evaluation engine: tiled, sharded pair scoring and re-identification metrics.

Re-ranking and TLift live in the `rerank` and `tlift` submodules (the functions of the same names
are exported as `jaxreid.rerank` and `jaxreid.tlift`).
"""
from jaxreid.eval.metrics import evaluate_ranking, top_k
from jaxreid.eval.scoring import pairwise_self_scores, score_matrix

__all__ = ["evaluate_ranking", "pairwise_self_scores", "score_matrix", "top_k"]
