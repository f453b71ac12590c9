"""Transformer-Cross (TransMatcher paper, Sec. 4 / Table 2): the vanilla Transformer with the
probe's neck map as the decoder queries and the gallery's encoded map as the memory, one logit
per pair; trained like TransMatcher (graph sampler, pairwise BCE) with the same data, optimiser
and epochs.

Default: a small model on the embedded synthetic_reid (train domain_a, test domain_b), a few
minutes on a 2-core CPU. `configs/transformer_cross.py:table2` is the paper's Table 2 setting
(MSMT17 → CUHK03-NP, Market; d=128, D=512, N=2, H=1).
"""
from configs.transformer_cat import pair_transformer_config


def get_config(setting: str = "synthetic"):
  c = pair_transformer_config("transformer_cross", setting)
  if setting == "synthetic":
    # A tile holds tile_p·tile_g pair sequences of S = 8 probe tokens; the largest tensor per
    # layer is the FFN hidden [pairs, 8, D]: 64·128 pairs → about 34 MB.
    c.eval.update(tile_p=64, tile_g=128)
  else:
    # S = 192 probe tokens a pair at 384×128; per pair and layer the FFN hidden (192·512) and
    # the self- and cross-attention (2·192·192) take about 0.4 + 0.3 MB in float32: a 32 × 32
    # tile ≈ 0.7 GB. Maps [neck, memory] are 2·192·128 values per image, stored in bfloat16.
    c.eval.update(batch_size=128, tile_p=32, tile_g=32)
  return c
