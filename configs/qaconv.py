"""QAConv (ECCV 2020): class-memory training with the focal loss (docs/methods/qaconv.md)."""
from configs.common import base_config, paper_recipe

PAPER = {  # R1 / mAP (%) of QAConv-50 (ECCV 2020, Table 1) per (training set, test set)
    "market1501": {"dukemtmc_reid": {"R1": 48.8, "mAP": 28.7}},
    "dukemtmc_reid": {"market1501": {"R1": 58.6, "mAP": 27.2}},
}


def qaconv_fields(c):
  c.model.name = "qaconv"
  c.model.head = "v2.1"             # "v2.1": shared Linear(hw) per direction; "v1": Linear(2hw)
  return c


def get_config(setting: str = "synthetic"):
  c = qaconv_fields(base_config())
  c.train.loss = "memory"
  c.train.focal_gamma = 2.0
  c.data.sampler = "random"   # every image once per epoch, as the official code
  # From scratch on synthetic_reid the class memory needs a gentler lr and clipping, else the
  # focal loss collapses to constant logits (PK sampling: stale memories, same collapse).
  c.train.update(lr=0.01, clip_norm=8.0, epochs=20, lr_step_epochs=(15,))
  if setting == "synthetic":
    return c
  if setting in ("market", "duke"):
    train = "market1501" if setting == "market" else "dukemtmc_reid"
    c = paper_recipe(c, train, PAPER[train])
    c.data.batch_size = 32
    c.model.neck = 128
    c.train.clip_norm = 0.0
    return c
  raise ValueError(f"configs/qaconv.py has no setting {setting!r}; use synthetic, market or duke.")
