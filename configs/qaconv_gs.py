"""QAConv-GS: QAConv v2.1 trained with the graph sampler and pairwise BCE (METHODS.md).

Default: a small model on the embedded synthetic_reid (train domain_a, test domain_b), a few
minutes on a 2-core CPU. `configs/qaconv_gs.py:<setting>` selects the paper's full settings.
"""
from configs.common import base_config

PAPER = {  # R1 / mAP (%), QAConv-GS v2.1, METHODS.md
    "market_msmt": {"R1": 45.9, "mAP": 17.2},
    "market_cuhk": {"R1": 19.1, "mAP": 18.1},
    "msmt17_all": {"R1": 82.4, "mAP": 56.9},
}


def paper_settings(c, train, test, paper_key):
  c.dataset.train, c.dataset.test = train, test
  c.data.height, c.data.width = 384, 128
  c.data.batch_size, c.data.num_instances = 64, 4
  c.data.augment.update(pad=10, color_jitter=True)
  c.model.update(depth=50, width=64, ibn="b", freeze_bn=True, neck=128)
  c.train.update(epochs=15, lr=0.005, backbone_lr_mult=0.1, lr_step_epochs=(10,), clip_norm=8.0, bf16=True,
                 checkpoint_every_steps=1000)
  c.eval.batch_size = 128
  c.eval.paper = PAPER[paper_key]
  return c


def get_config(setting: str = "synthetic"):
  c = base_config()
  c.train.loss = "pairwise"
  c.data.sampler = "gs"
  if setting == "synthetic":
    return c
  if setting == "market":
    return paper_settings(c, "market1501", "msmt17", "market_msmt")
  if setting == "msmt17_all":
    return paper_settings(c, "msmt17/all", "market1501", "msmt17_all")
  raise ValueError(f"configs/qaconv_gs.py has no setting {setting!r}; use synthetic, market or "
                   "msmt17_all.")
