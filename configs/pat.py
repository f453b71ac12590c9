"""PAT (part-aware Transformer, CVPR 2023): a ViT with three part tokens under the part-aware
attention mask; ID loss with part-guided soft labels (PSD) + soft-margin batch-hard triplet on the
class token + contrastive part learning against a per-image part memory bank (CSL); ranked by
cosine of the L2-normalised class token (docs/methods/pat.md).

Default: a tiny ViT (width 64, depth 3, one head, 8×8 patches → an 8×4 grid on 64×32 images)
trained from scratch on synthetic_reid domain_a and tested on domain_a's disjoint test ids, about
a minute on a 2-core CPU.
`configs/pat.py:market` is the paper's single-source setting (Market-1501 → DukeMTMC-reID,
MSMT17, CUHK03-NP), `:to_msmt17`, `:to_duke`, `:to_market`, `:to_cuhk03` its multi-source
leave-one-out settings (the other three datasets as sources), all with ViT-B/16 and ImageNet
weights through model.pretrained.
"""
from configs.common import base_config
from jaxreid.backbones.vit import variant_fields

MARKET, DUKE, MSMT, CUHK = "market1501", "dukemtmc_reid", "msmt17", "cuhk03_np/detected"
PAPER = {  # R1 / mAP (%): training set(s) → test sets
    # paper Table 1, single source Market-1501
    "market": (MARKET, {DUKE: {"R1": 67.9, "mAP": 48.9}, MSMT: {"R1": 42.8, "mAP": 18.2},
                        CUHK: {"R1": 25.4, "mAP": 26.0}}),
    # paper Table 3, multi-source leave-one-out over M, D, MS, C (CUHK03-NP detected)
    "to_msmt17": (",".join((MARKET, DUKE, CUHK)), {MSMT: {"R1": 45.6, "mAP": 21.6}}),
    "to_duke": (",".join((MSMT, MARKET, CUHK)), {DUKE: {"R1": 71.8, "mAP": 56.5}}),
    "to_market": (",".join((MSMT, DUKE, CUHK)), {MARKET: {"R1": 75.2, "mAP": 51.7}}),
    "to_cuhk03": (",".join((MSMT, MARKET, DUKE)), {CUHK: {"R1": 31.1, "mAP": 31.5}}),
}


def pat_fields(c):
  m = c.model
  m.name = "pat"
  m.backbone = "vit"
  m.neck = 0
  m.input_norm = "half"               # mean = std = 0.5
  m.update(variant_fields("deit_tiny"))
  m.update(vit_dim=64, vit_depth=3, vit_heads=1)   # heads = width / 64, as the official variants
  m.patch_size = 8
  m.stride_size = 8                   # < patch_size: overlapping patches
  m.drop_path = 0.1
  m.part_tokens = 3
  m.freeze_patch_embed = True         # the official FREEZE_PATCH_EMBED
  m.input_height = c.data.get_ref("height")   # the position embedding's grid follows the data
  m.input_width = c.data.get_ref("width")
  m.random_test_masks = False         # True: random part regions per test batch (official code)
  m.test_mask_seed = 0                # their key (with each batch's pixels)
  m.num_classes = 0                   # = the number of training ids
  c.data.sampler = "pk"
  c.data.augment.update(rotate_deg=0.0, occlusion=False, random_erasing=0.0)
  t = c.train
  t.loss = "pat"
  t.label_smoothing = 0.1
  t.triplet_weight = 1.0              # soft-margin batch-hard triplet on the class token
  t.pat = dict(
      prefill=True,                   # official: fill the bank with the initial model first
      csl_weight=1.0,                 # official PC_LR
      k=10,                           # positives per part feature (CLUSTER_K)
      memory_momentum=0.1,
      csl_similarity="euclidean",     # s = −csl_scale·‖f − w‖² (official); "cosine": cos / τ
      csl_scale=0.02,                 # PC_SCALE
      csl_temperature=0.02,
      soft_labels=True,               # PSD (paper); the official code leaves it off
      soft_weight=0.5,                # α
      soft_lambda=0.5)                # λ
  t.optimizer = "sgd"
  t.nesterov = False
  t.momentum = 0.9
  t.weight_decay = 1e-4
  t.clip_norm = 0.0
  t.backbone_lr_mult = 1.0
  return c


def get_config(setting: str = "synthetic"):
  c = pat_fields(base_config())
  if setting == "synthetic":
    # Same-domain test (ids disjoint from training), as configs/embedding.py: a ViT trained from
    # scratch on 1.3k images barely transfers to domain_b in minutes (6 epochs: mAP 0.86 → 1.3
    # there, 2.26 → 7.76 on domain_a). From scratch the patch embedding is trained, with Adam.
    c.dataset.test = "synthetic_reid/domain_a"
    c.model.freeze_patch_embed = False
    c.data.batch_size, c.data.num_instances = 32, 4
    c.train.update(optimizer="adam", lr=2e-3, epochs=6, lr_step_epochs=(5,))
    return c
  if setting in PAPER:
    return paper_settings(c, *PAPER[setting])
  raise ValueError(f"configs/pat.py has no setting {setting!r}; use synthetic or one of "
                   f"{sorted(PAPER)}.")


def paper_settings(c, train, paper):
  """The official recipe (config/PAT.yml): ViT-B/16 (ImageNet weights through model.pretrained,
  e.g. jx_vit_base_p16_224-80ecf9dd.pth), stride 16, 256×128, mean = std = 0.5, flip + pad 10 /
  crop, no random erasing; PK 16 × 4 from the RandomIdentitySampler (every image once per
  epoch, also in the pass that pre-fills the part memory bank); SGD lr 1e-3 (4e-4 for MSMT17),
  momentum 0.9, wd 1e-4; 60 epochs; the schedule stepped at each epoch start (scheduler epoch
  e = 1…60): linear warmup from 0.01·lr over 5, then cosine towards 0.002·lr over 120 (stopped
  at 60); biases at ×2 lr (docs/methods/pat.md)."""
  c.dataset.train = train
  c.dataset.test = ",".join(paper)
  c.data.height, c.data.width = 256, 128
  c.data.batch_size, c.data.num_instances = 64, 4
  c.data.sampler = "identity"         # the official RandomIdentitySampler (DATALOADER.NAIVE_WAY)
  c.data.augment.update(pad=10, color_jitter=False)
  c.model.update(variant_fields("vit_base"))
  c.model.update(patch_size=16, stride_size=16)
  c.train.update(lr=1e-3 if train != MSMT else 4e-4, epochs=60, lr_schedule="cosine",
                 cosine_epochs=120, cosine_min_factor=0.002, warmup_epochs=5, warmup_factor=0.01,
                 lr_epoch_offset=1, bias_lr_mult=2.0, bf16=True, checkpoint_every_steps=1000)
  c.eval.update(batch_size=128, tile_p=1024, tile_g=4096)
  c.eval.paper = paper
  return c
