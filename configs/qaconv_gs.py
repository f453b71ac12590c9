"""QAConv-GS: QAConv v2.1 trained with the graph sampler and pairwise BCE
(docs/methods/qaconv.md).

Default: a small model on the embedded synthetic_reid (train domain_a, test domain_b), a few
minutes on a 2-core CPU. `configs/qaconv_gs.py:<setting>` selects the paper's full settings.
"""
from configs.common import base_config, pairwise_training, paper_recipe
from configs.qaconv import qaconv_fields

PAPER = {  # R1 / mAP (%) of QAConv-GS v2.1 (official release) per (training set, test set)
    "market1501": {"cuhk03_np/detected": {"R1": 19.1, "mAP": 18.1},
                   "msmt17": {"R1": 45.9, "mAP": 17.2}},
    "msmt17/all": {"market1501": {"R1": 82.4, "mAP": 56.9}},
}


def paper_settings(c, train):
  c = paper_recipe(c, train, PAPER[train])
  c.model.neck = 128
  c.train.clip_norm = 8.0
  return c


def get_config(setting: str = "synthetic"):
  c = pairwise_training(qaconv_fields(base_config()))
  if setting == "synthetic":
    return c
  if setting == "market":
    return paper_settings(c, "market1501")
  if setting == "msmt17_all":
    return paper_settings(c, "msmt17/all")
  raise ValueError(f"configs/qaconv_gs.py has no setting {setting!r}; use synthetic, market or "
                   "msmt17_all.")
