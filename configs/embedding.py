"""Embedding baseline (the "Res50" of the NFormer paper, reid-strong-baseline): ResNet with
last stride 1 → global average pooling → Linear(C→256) → BNNeck → classifier, trained with
label-smoothed CE + batch-hard triplet (margin 0.3) + 0.0005·center loss on PK batches with Adam,
warmup and steps (docs/methods/nformer.md). Ranked by cosine similarity of the post-BN vectors. It is
also NFormer's stage 1 (configs/nformer.py).

Default: a small model on the embedded synthetic_reid (train and test domain_a), a few
minutes on a 2-core CPU. `configs/embedding.py:<setting>` selects the paper's full settings.
"""
from configs.common import base_config

PAPER = {  # same-domain R1 / mAP (%) of the NFormer paper's Res50 (Table 4): training set, tests
    "market": ("market1501", {"market1501": {"R1": 93.2, "mAP": 83.5}}),
    "duke": ("dukemtmc_reid", {"dukemtmc_reid": {"R1": 86.1, "mAP": 76.1}}),
    "msmt17": ("msmt17", {"msmt17": {"R1": 74.9, "mAP": 50.1}}),
}


def embedding_fields(c):
  c.model.name = "embedding"
  c.model.final_layer = "layer4"
  c.model.last_stride = 1
  c.model.neck = 0                  # no 3×3 neck conv: the global head follows the backbone
  c.model.input_norm = "imagenet"
  c.model.embed_dim = 256           # Linear(C→embed_dim) "projection"; 0 = none (BNNeck on C)
  c.model.pooling = "gap"
  c.model.num_classes = 0           # classifier width; 0 = the number of training ids
  c.data.sampler = "pk"
  c.data.augment.update(rotate_deg=0.0, occlusion=False, random_erasing=0.5)
  c.train.loss = "embedding"
  c.train.optimizer = "adam"
  c.train.label_smoothing = 0.1
  c.train.triplet_weight = 1.0
  c.train.triplet_margin = 0.3
  c.train.center_weight = 0.0005
  c.train.center_lr = 0.5           # plain SGD on the centres, on the unweighted center loss
  c.train.clip_norm = 0.0
  c.train.weight_decay = 5e-4
  c.train.backbone_lr_mult = 1.0
  c.train.warmup_factor = 0.01
  return c


def get_config(setting: str = "synthetic"):
  c = embedding_fields(base_config())
  if setting == "synthetic":
    # Same-domain test, as the NFormer paper (test ids are disjoint from the training ids).
    c.dataset.test = "synthetic_reid/domain_a"
    c.train.update(lr=3.5e-3, epochs=12, lr_step_epochs=(9,), warmup_epochs=2)
    return c
  if setting in PAPER:
    return paper_settings(c, *PAPER[setting])
  raise ValueError(f"configs/embedding.py has no setting {setting!r}; use synthetic or one of "
                   f"{sorted(PAPER)}.")


def paper_settings(c, train, paper):
  """The official recipe (reid-strong-baseline as NFormer runs it, docs/methods/embedding.md):
  - ResNet-50 without IBN and without the stem ReLU (conv1 → bn1 → maxpool), last stride 1, BN
    trained, ImageNet weights through model.pretrained; GAP → Linear 2048→256 → BNNeck;
  - 256×128, bilinear resize; pad 10 + random crop, flip 0.5, random erasing 0.5 filled with
    PIXEL_MEAN after normalisation; ImageNet input normalisation;
  - RandomIdentitySampler: P 16 × K 4, every image once per epoch (data.sampler "identity");
  - CE (label smoothing 0.1) + batch-hard triplet 0.3 + 0.0005·center (centres by SGD 0.5);
  - Adam 3.5e-4, wd 5e-4 (all parameters), 120 epochs; WarmupMultiStepLR stepped at each epoch
    start: epoch e (0-based) at last_epoch e + 1, warmup 10 from ×0.01, ×0.1 at 40 and 70."""
  c.dataset.train = train
  c.dataset.test = ",".join(paper)
  c.data.height, c.data.width = 256, 128
  c.data.batch_size, c.data.num_instances = 64, 4
  c.data.sampler = "identity"
  c.data.resize = "bilinear"
  c.data.augment.update(pad=10, color_jitter=False, erase_fill="after_normalize")
  c.model.update(depth=50, width=64, ibn="none", freeze_bn=False, stem_relu=False)
  c.train.update(lr=3.5e-4, epochs=120, lr_step_epochs=(40, 70), warmup_epochs=10,
                 lr_epoch_offset=1, checkpoint_every_steps=1000)
  c.eval.update(batch_size=128, tile_p=1024, tile_g=4096)
  c.eval.paper = paper
  return c
