"""QAConv-GS: QAConv trained in-batch with the graph sampler (docs/methods/qaconv.md).

Default: a small model on the embedded synthetic_reid (train domain_a, test domain_b), a few
minutes on a 2-core CPU; pairwise BCE, K = 4, a fixed 12/10 schedule. `configs/qaconv_gs.py:
<setting>` selects the paper's full settings:

- `:market`, `:msmt17_all`: QAConv-GS v2.1 (the official release's main.py), trained on Market-1501
  or every MSMT17 image. ResNet-50-IBN-b with frozen BN (ImageNet weights via model.pretrained),
  layer3 → 3×3 neck conv with bias to 128, head v2.1; 384×128, pad 10 + flip + rotation 5° +
  colour jitter + occlusion; graph sampler with B = 64, K = 2 (31 neighbour classes); batch-hard
  triplet on the scores, margin 16, non-finite anchors dropped; SGD (Nesterov 0.9, wd 5e-4) lr
  0.005, backbone ×0.1; gradient norm clipped at 8 per group; the adaptive schedule (base loss =
  epoch 2's mean loss; lr ×0.1 after the first epoch e whose mean loss < 0.7 × base, then stop
  after min(60, e + e // 2)); bfloat16.
- `:market_v20`, `:msmt17_all_v20`: QAConv-GS v2.0 (official main_gs.py at tag v2.0): as above but
  head v1, BN trained, neck 64 (a bias-free 3×3 conv followed by BatchNorm2d), pairwise BCE with
  K = 4, lr 0.001 (backbone ×0.1), clipping at 512, 15 epochs with a ×0.1 step at 10, float32;
  the first epoch with the random PK index (data.gs_pre_epochs = 1), then the graph sampler on
  v2.0's distance 1 − sigmoid(score / 10), k-reciprocal re-ranked (data.gs_rerank). What remains
  different (docs/methods/qaconv.md): the pre-epoch drops its last partial batch, and ties in
  the re-ranking rank in index order.
"""
from configs.common import base_config, pairwise_training, paper_recipe
from configs.qaconv import qaconv_fields

PAPER = {  # R1 / mAP (%) of QAConv-GS v2.1 (official release) per (training set, test set)
    "market1501": {"cuhk03_np/detected": {"R1": 19.1, "mAP": 18.1},
                   "msmt17": {"R1": 45.9, "mAP": 17.2}},
    "msmt17/all": {"market1501": {"R1": 82.4, "mAP": 56.9}},
}
PAPER_V20 = {  # R1 / mAP (%) of QAConv 2.0 (official README at tag v2.1, "Performance")
    "market1501": {"cuhk03_np/detected": {"R1": 16.4, "mAP": 15.7},
                   "msmt17": {"R1": 41.2, "mAP": 15.0}},
    "msmt17/all": {"market1501": {"R1": 80.6, "mAP": 55.6}},
}
SETTINGS = {"market": ("market1501", "v2.1"), "msmt17_all": ("msmt17/all", "v2.1"),
            "market_v20": ("market1501", "v2.0"), "msmt17_all_v20": ("msmt17/all", "v2.0")}


def paper_settings(c, train, version="v2.1"):
  if version == "v2.0":
    c = paper_recipe(c, train, PAPER_V20[train])
    c.model.update(neck=64, neck_bn=True, head="v1", freeze_bn=False)
    c.data.update(gs_pre_epochs=1, gs_rerank=True)
    c.train.update(lr=0.001, clip_norm=512.0, bf16=False)
    return c
  c = paper_recipe(c, train, PAPER[train])
  c.model.neck = 128
  c.data.num_instances = 2
  c.train.update(loss="triplet", triplet_margin=16.0, clip_norm=8.0, epochs=60,
                 lr_step_epochs=(), adaptive_step_factor=0.7)
  return c


def get_config(setting: str = "synthetic"):
  c = pairwise_training(qaconv_fields(base_config()))
  c.train.adaptive_step_factor = 0.0    # > 0: QAConv-GS v2.1's adaptive schedule (epochs = max)
  if setting == "synthetic":
    return c
  if setting in SETTINGS:
    return paper_settings(c, *SETTINGS[setting])
  raise ValueError(f"configs/qaconv_gs.py has no setting {setting!r}; use synthetic or one of "
                   f"{', '.join(SETTINGS)}.")
