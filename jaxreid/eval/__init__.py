"""Evaluation engine: tiled, sharded pair scoring and re-identification metrics."""
from jaxreid.eval.metrics import evaluate_ranking
from jaxreid.eval.scoring import pairwise_self_scores, score_matrix

__all__ = ["evaluate_ranking", "pairwise_self_scores", "score_matrix"]
