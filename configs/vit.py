"""ViT-style comparison model of the TransMatcher paper (Table 2): the TransMatcher feature side
(backbone + neck to d) followed by a ViT encoder — learned class token and positional embedding,
N post-LN encoder layers — whose class-token output is the image's embedding, trained by
classification (label-smoothed CE over the training ids, BNNeck) and ranked by cosine similarity
(docs/methods/embedding.md). Same data, sampler, optimiser and epochs as configs/transmatcher.py,
so the two compare at the same budget. `configs/vit.py:table2` is the paper's Table 2 setting
(d=512, D=2048, N=3).
"""
from configs.common import base_config, pairwise_training, table2_recipe, transformer_fields


def classification_fields(c, pooling: str):
  """An embedding model with the Transformer `pooling` over the neck map, trained by CE."""
  c.model.name = "embedding"
  c.model.pooling = pooling
  c.model.embed_dim = 0             # BNNeck directly on the d-dim token output
  c.model.num_classes = 0           # = the number of training ids
  c.model.pos_embed = True          # ViT / the vanilla Transformer have positional codes
  c.train.loss = "embedding"
  c.train.label_smoothing = 0.1
  c.train.triplet_weight = 0.0      # classification only
  c.train.triplet_margin = 0.3
  c.train.center_weight = 0.0
  c.train.center_lr = 0.5
  return c


def base_for(model: str, setting: str):
  """TransMatcher's budget for this comparison model (graph sampler, SGD, epochs, feature side):
  `synthetic` or the Table 2 setting `table2`."""
  c = pairwise_training(base_config())
  c.train.clip_norm = 4.0
  if setting == "synthetic":
    c = transformer_fields(c)
    c.train.update(epochs=4, lr_step_epochs=(3,))
    c.model.normalize = True
    return c
  if setting == "table2":
    return table2_recipe(c, model)
  raise ValueError(f"configs/{model}.py has no setting {setting!r}; use synthetic or table2.")


def get_config(setting: str = "synthetic"):
  return classification_fields(base_for("vit", setting), "vit")
