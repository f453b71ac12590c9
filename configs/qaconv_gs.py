"""QAConv-GS: QAConv v2.1 trained with the graph sampler and pairwise BCE (METHODS.md).

Default: a small model on the embedded synthetic_reid (train domain_a, test domain_b), a few
minutes on a 2-core CPU. `configs/qaconv_gs.py:<setting>` selects the paper's full settings.
"""
from configs.common import base_config

PAPER = {  # R1 / mAP (%) of QAConv-GS v2.1 per (training set, test set), METHODS.md
    "market1501": {"cuhk03_np/detected": {"R1": 19.1, "mAP": 18.1},
                   "msmt17": {"R1": 45.9, "mAP": 17.2}},
    "msmt17/all": {"market1501": {"R1": 82.4, "mAP": 56.9}},
}


def paper_settings(c, train):
  """The paper's training recipe on `train`, tested on the sets the paper reports for it."""
  c.dataset.train = train
  c.dataset.test = ",".join(PAPER[train])
  c.data.height, c.data.width = 384, 128
  c.data.batch_size, c.data.num_instances = 64, 4
  c.data.augment.update(pad=10, color_jitter=True)
  c.model.update(depth=50, width=64, ibn="b", freeze_bn=True, neck=128)
  c.train.update(epochs=15, lr=0.005, backbone_lr_mult=0.1, lr_step_epochs=(10,),
                 clip_norm=8.0, bf16=True, checkpoint_every_steps=1000)
  c.eval.batch_size = 128
  c.eval.paper = PAPER[train]
  return c


def get_config(setting: str = "synthetic"):
  c = base_config()
  c.train.loss = "pairwise"
  c.data.sampler = "gs"
  if setting == "synthetic":
    return c
  if setting == "market":
    return paper_settings(c, "market1501")
  if setting == "msmt17_all":
    return paper_settings(c, "msmt17/all")
  raise ValueError(f"configs/qaconv_gs.py has no setting {setting!r}; use synthetic, market or "
                   "msmt17_all.")
