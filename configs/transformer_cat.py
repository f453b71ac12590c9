"""Transformer-Cat (TransMatcher paper, Sec. 4 / Table 2): probe and gallery neck maps
concatenated into one sequence through ViT-style encoder layers, one logit per pair; trained
like TransMatcher (graph sampler, pairwise BCE) with the same data, optimiser and epochs
(docs/methods/transformer_pairs.md).

Default: a small model on the embedded synthetic_reid (train domain_a, test domain_b), a few
minutes on a 2-core CPU. `configs/transformer_cat.py:table2` is the paper's Table 2 setting
(MSMT17 → CUHK03-NP, Market; d=128, D=512, N=2, H=1).
"""
from configs.common import base_config, pairwise_training, table2_recipe, transformer_fields


def pair_transformer_config(name: str, setting: str):
  """Transformer-Cat / -Cross at the budget of configs/transmatcher.py's `setting` (synthetic |
  table2): the same data, sampler, optimiser, epochs and feature side, N = 2."""
  c = pairwise_training(base_config())
  c.train.clip_norm = 4.0
  if setting == "synthetic":
    transformer_fields(c, num_layers=2)   # N, as in Table 2 for these two models
    c.train.update(epochs=4, lr_step_epochs=(3,))
    c.model.normalize = True
  elif setting == "table2":
    c = table2_recipe(c, name)
  else:
    raise ValueError(f"configs/{name}.py has no setting {setting!r}; use synthetic or table2.")
  c.model.name = name
  # Cat: learned positional embedding of the map grid in the matcher (ViT); Cross: added to the
  # neck map before the encoders (as TransMatcher's Table 3 switch; off like its default).
  c.model.pos_embed = name == "transformer_cat"
  if name == "transformer_cross":
    c.model.readout = "mean"        # pair vector: "mean" | "max" over probe tokens, or "cls"
  # Encoder layers: "torch" starts them as PyTorch's nn.TransformerEncoder does (its init, every
  # layer a copy of one), as for TransMatcher's paper settings; the synthetic default keeps the
  # per-layer xavier init it was tuned with.
  c.model.encoder_init = "torch" if setting == "table2" else "xavier"
  return c


def get_config(setting: str = "synthetic"):
  c = pair_transformer_config("transformer_cat", setting)
  if setting == "synthetic":
    # A tile holds tile_p·tile_g pair sequences of 2S + 1 = 17 tokens; the largest tensors per
    # layer are the FFN hidden [pairs, 17, D] and the attention [pairs, 17, 17]: 32·128 pairs
    # → about 40 MB each.
    c.eval.update(tile_p=32, tile_g=128)
  else:
    # 2S + 1 = 385 tokens a pair at 384×128; per pair and layer the FFN hidden (385·512) and
    # the attention (385·385) take about 0.8 + 0.6 MB in float32: a 16 × 32 tile ≈ 0.7 GB.
    c.eval.update(batch_size=128, tile_p=16, tile_g=32)
  return c
