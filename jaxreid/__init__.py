"""jaxreid: person re-identification in JAX/Flax.

`load(method_or_config, checkpoint)` gives a `ReidModel` (encode images, match feature maps);
`evaluate_ranking(scores, query_ids, gallery_ids, query_cams, gallery_cams)` gives CMC/mAP/mINP;
`rerank` (k-reciprocal re-ranking) and `tlift` (temporal lifting) post-process a score matrix.

The names are resolved on first use, so importing a submodule (`jaxreid.eval.metrics`, a method)
does not load the rest of the library.
"""
import importlib

_EXPORTS = {"ReidModel": "jaxreid.api", "load": "jaxreid.api",
            "evaluate_ranking": "jaxreid.eval.metrics", "top_k": "jaxreid.eval.metrics",
            "rerank": "jaxreid.eval.rerank", "tlift": "jaxreid.eval.tlift"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'jaxreid' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
