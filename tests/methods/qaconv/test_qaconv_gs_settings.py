"""QAConv-GS paper settings against the official command-line defaults (transcribed here from
main.py of the latest release, v2.1, and main_gs.py at tag v2.0)."""
import pytest

from configs import qaconv_gs
from jaxreid.train.schedule import AdaptiveSchedule, from_config

OFFICIAL_V21 = dict(batch_size=64, num_instance=2, height=384, width=128, neck=128, ibn="b",
                    lr=0.005, margin=16.0, step_factor=0.7, max_epochs=60, clip_value=8.0)
OFFICIAL_V20 = dict(batch_size=64, num_instance=4, height=384, width=128, neck=64, ibn="b",
                    lr=0.001, epochs=15, step_size=10, clip_value=512.0)


@pytest.mark.parametrize("setting", ["market", "msmt17_all"])
def test_v21_settings(setting):
  c = qaconv_gs.get_config(setting)
  o = OFFICIAL_V21
  assert (c.data.batch_size, c.data.num_instances, c.data.height, c.data.width) == (
      o["batch_size"], o["num_instance"], o["height"], o["width"])
  assert (c.model.neck, c.model.ibn, c.model.head, c.model.freeze_bn) == (o["neck"], o["ibn"],
                                                                          "v2.1", True)
  t = c.train
  assert (t.loss, t.triplet_margin, t.lr, t.backbone_lr_mult, t.clip_norm) == (
      "triplet", o["margin"], o["lr"], 0.1, o["clip_value"])
  schedule = from_config(t)
  assert isinstance(schedule, AdaptiveSchedule)
  assert (schedule.step_factor, schedule.max_epochs, schedule.lr_factor) == (
      o["step_factor"], o["max_epochs"], 0.1)
  assert c.dataset.train == {"market": "market1501", "msmt17_all": "msmt17/all"}[setting]
  assert c.eval.paper.to_dict() == qaconv_gs.PAPER[c.dataset.train]


@pytest.mark.parametrize("setting,numbers", [
    ("market_v20", {"cuhk03_np/detected": (16.4, 15.7), "msmt17": (41.2, 15.0)}),
    ("msmt17_all_v20", {"market1501": (80.6, 55.6)})])
def test_v20_settings(setting, numbers):
  c = qaconv_gs.get_config(setting)
  o = OFFICIAL_V20
  assert (c.data.batch_size, c.data.num_instances, c.model.neck, c.model.head,
          c.model.freeze_bn) == (o["batch_size"], o["num_instance"], o["neck"], "v1", False)
  t = c.train
  assert (t.loss, t.lr, t.backbone_lr_mult, t.clip_norm, t.epochs, tuple(t.lr_step_epochs)) == (
      "pairwise", o["lr"], 0.1, o["clip_value"], o["epochs"], (o["step_size"],))
  assert from_config(t) is None
  assert {k: (v["R1"], v["mAP"]) for k, v in c.eval.paper.items()} == numbers


def test_synthetic_default_is_unchanged():
  t = qaconv_gs.get_config().train
  assert (t.loss, t.epochs, tuple(t.lr_step_epochs)) == ("pairwise", 12, (10,))
  assert from_config(t) is None and qaconv_gs.get_config().data.num_instances == 4
