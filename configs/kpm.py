"""KPM (CVPR 2018): Kronecker-product matching + soft warping + self-residual attention on a
three-scale hourglass, trained with BCE on sampled pairs (docs/methods/kpm.md).

Default: a small model on the embedded synthetic_reid (train domain_a, test domain_b), a few
minutes on a 2-core CPU. `configs/kpm.py:<setting>` selects the paper's settings (`:market`,
`:duke`, `:cuhk03`, same-domain) or the authors' released variant (`:released`, for their
checkpoints).
"""
from configs.common import base_config

PAPER = {  # R1 / mAP (%) of KPM (paper Tables 2-4), same-domain: training set, pos:neg, test
    "market": ("market1501", 3, {"market1501": {"R1": 90.1, "mAP": 75.3}}),
    "duke": ("dukemtmc_reid", 4, {"dukemtmc_reid": {"R1": 80.3, "mAP": 63.2}}),
    "cuhk03": ("cuhk03/labeled", 4, {"cuhk03/labeled": {"R1": 91.1, "mAP": 89.2}}),
}


def kpm_fields(c):
  c.model.name = "kpm"
  c.model.variant = "paper"         # "paper": hourglass + RSA; "released": the authors' code
  c.model.scales = 3                # hourglass scales (1 = the final map only)
  c.model.tau = 0.05                # τ_KPM (Eq. 5); the released code's temperature is 1
  c.model.tau_rsa = 1.0             # τ_RSA (Eq. 9)
  c.model.rsa_channels = 256        # width of the two 1×1 convs of the attention
  c.model.groups = 1                # released variant: channel groups / embeds
  c.model.dropout = 0.0             # released variant: dropout before the classifier
  c.model.normalize = False         # warp/subtract L2-normalised maps (paper, authors: raw)
  c.model.map_dtype = "float32"     # of encode()'s maps; "bfloat16" halves feature memory
  c.model.final_layer = "layer4"
  c.model.neck = 0
  c.model.input_norm = "imagenet"
  c.data.sampler = "multi_gallery"   # the authors' RandomMultipleGallerySampler
  c.train.loss = "pairs"
  c.train.pos_per_anchor = 3        # = data.num_instances - 1: every positive of each anchor
  c.train.neg_ratio = 3.0           # negatives per positive (paper: 3 Market, 4 CUHK03/Duke)
  c.train.rw_alpha = 0.9            # "random_walk" loss: the random walk's α
  return c


def get_config(setting: str = "synthetic"):
  c = kpm_fields(base_config())
  if setting == "synthetic":
    c.model.rsa_channels = 64
    # Raw maps, as the paper settings (33 PK epochs: mAP 5.44 raw vs 3.93 with model.normalize;
    # a tiny model after 6 PK epochs is the other way round: 2.95 raw vs 3.96 normalised).
    # 4 multi-gallery epochs of 175 batches (1,400 images × K 4 / 32) = 700 steps, near the 600
    # of the other synthetic defaults (4 GS epochs); the lr drops for the last epoch.
    c.train.update(epochs=4, lr=0.05, lr_step_epochs=(3,), clip_norm=8.0)
    return c
  if setting in PAPER or setting == "released":
    train, ratio, paper = PAPER.get(setting, PAPER["market"])
    c.dataset.train = train
    c.dataset.test = ",".join(paper)
    c.data.height, c.data.width = 256, 128
    c.data.batch_size, c.data.num_instances = 64, 4
    c.data.augment.update(pad=0, flip=True, rotate_deg=0.0, color_jitter=False, occlusion=False,
                          random_erasing=0.5)
    c.model.update(depth=50, width=64, ibn="none", freeze_bn=False)
    c.train.update(epochs=100, lr=0.01, backbone_lr_mult=1.0, lr_step_epochs=(50,),
                   clip_norm=0.0, neg_ratio=float(ratio), checkpoint_every_steps=1000)
    # One tile holds tile_p·tile_g·M² affinities per scale: 16·32·512²·4 B = 0.5 GB at scale 3.
    c.eval.update(batch_size=64, tile_p=16, tile_g=32)
    c.eval.paper = paper
    if setting == "released":
      # The authors' examples/main.py (docs/methods/kpm.md lists where it differs from the
      # paper): one scale on layer4, temperature 1, input 384×128; two groups and dropout 0.8
      # (their README's command and checkpoints); RandomWalkGrpShufTrainer's random-walk loss
      # (α 0.9); Adam, weight decay 5e-4, the backbone at 2e-4 and the embeds ×10; 150 epochs,
      # ×0.1 every 40 epochs (their adjust_lr); batches of 256.
      c.model.update(variant="released", scales=1, tau=1.0, groups=2, dropout=0.8)
      c.data.height = 384
      c.data.batch_size = 256
      c.train.update(loss="random_walk", rw_alpha=0.9, optimizer="adam", lr=2e-3,
                     backbone_lr_mult=0.1, weight_decay=5e-4, epochs=150,
                     lr_step_epochs=(40, 80, 120))
      c.eval.paper = {}
      # The authors' evaluation (README: --rerank 75 --alpha 0.95): the top 75 of the pooled
      # features' Euclidean ranking re-scored, with the group-shuffling random walk.
      c.eval.update(rescore_top_k=75, random_walk_alpha=0.95)
    return c
  raise ValueError(f"configs/kpm.py has no setting {setting!r}; use synthetic, market, duke, "
                   "cuhk03 or released.")
