"""Vanilla-Transformer comparison model of the TransMatcher paper (Table 2): the TransMatcher
feature side, N post-LN encoder layers over the map (+ positional embedding), N decoder layers
with learned query embeddings (DETR-style) whose mean output is the image's embedding, trained by
classification like configs/vit.py and ranked by cosine similarity. Same budget as
configs/transmatcher.py; `:table2` is the paper's Table 2 setting (d=512, D=2048, N=3)."""
from configs.vit import base_for, classification_fields


def get_config(setting: str = "synthetic"):
  c = classification_fields(base_for("vanilla_transformer", setting), "decoder")
  c.model.num_queries = 4           # learned decoder queries, averaged
  return c
