"""NFormer (Wang et al., CVPR 2022): stage 1 = the embedding baseline of configs/embedding.py
(the paper's "Res50"), stage 2 = the NFormer head trained on its cached train features (CNN
frozen), evaluation = query + gallery refined as one set, ranked by cosine (docs/methods/nformer.md).

`python main.py --config configs/nformer.py` runs all three on the embedded synthetic_reid; the
results.json has the NFormer numbers under "test" and the stage-1 numbers under "stage1".
`configs/nformer.py:<setting>` (market, duke, msmt17) selects the paper's settings.
"""
import ml_collections
from ml_collections import config_dict

from configs import embedding

PAPER = {  # same-domain R1 / mAP (%) of NFormer with the Res50 extractor (Table 4)
    "market": {"market1501": {"R1": 94.7, "mAP": 91.1}},
    "duke": {"dukemtmc_reid": {"R1": 89.4, "mAP": 83.5}},
    "msmt17": {"msmt17": {"R1": 77.3, "mAP": 59.8}},
}


def nformer_fields(c) -> ml_collections.ConfigDict:
  c.method = "nformer"              # the NFormer pipeline on stage 1's model (model.name)
  n = c.nformer = ml_collections.ConfigDict()
  n.layers = 4
  n.dim = 0                         # 0 = model.embed_dim (the stage-1 vectors)
  n.heads = 2
  n.ffn = 1024
  n.k = 20                          # RNS neighbours (self included)
  n.num_landmarks = 5               # LAA landmarks
  n.num_classes = 0                 # classifier width; 0 = the number of training ids
  n.block = 2048                    # rows processed at a time (memory bound)
  # Training sets: a random centre and `set_size` of its nearest ⌊set_size·(1+u)⌋ train
  # features; `sets_per_step` sets per step (their rows form one loss batch); an epoch is
  # N // sets_per_epoch_divisor sets (official NFormerDataset: N // 30, 2 sets per batch).
  n.set_size = 7000
  n.sets_per_step = 2
  n.sets_per_epoch_divisor = 30
  n.set_metric = "dot"              # nearest rows by raw dot product (official) | "cosine"
  # Train features. Official: extracted again before every epoch through the augmenting train
  # transform (CNN in eval mode), not L2-normalised (extract_every_epoch, normalize_train False).
  # Otherwise: train_views = 0, one extraction with the eval transform; V > 0, V extractions under
  # the training augmentation, epoch e using view e mod V (both cached in workdir/nformer/).
  n.extract_every_epoch = True
  n.normalize_train = False         # True: L2-normalise the train features, as the test features
  n.train_views = 0
  n.epochs = 20
  n.lr = 1e-5                       # Adam (constant)
  n.weight_decay = 0.0              # L2 added to the gradient (official stage 2: none)
  n.dropout = 0.1                   # official RESID_PDROP: attention projection and MLP outputs
  n.label_smoothing = 0.1
  n.triplet_margin = 0.3
  n.center_weight = 0.0005
  n.center_lr = 0.5                 # plain SGD on the centres, on the unweighted center loss
  # Test: queries do not attend to other queries (paper); True = the official code's behaviour.
  n.query_interaction = False
  n.landmark_seed = 0               # fixed test-time landmarks: identical results across runs
  n.log_every_steps = 10
  n.checkpoint_every_steps = 200
  n.stop_at_step = config_dict.placeholder(int)   # checkpoint and stop (time-limited jobs)
  n.paper = ml_collections.ConfigDict()           # the NFormer paper's numbers, if any
  return c


def get_config(setting: str = "synthetic"):
  """Paper settings (market, duke, msmt17): stage 1 = configs/embedding.py:<setting> (the
  official reid-strong-baseline recipe); stage 2 as the official trainer: 4 blocks, d 256, 2 heads,
  FFN 1024, k 20, 5 landmarks drawn per block, dropout 0.1 on the attention projection and MLP
  outputs, 2 sets × 7000 per step (nearest rows by raw dot product) and N // 60 steps per epoch,
  Adam 1e-5 without weight decay,
  20 epochs, the train features extracted again every epoch through the augmenting train
  transform (CNN in eval mode, unnormalised); queries isolated at test time (paper)."""
  c = nformer_fields(embedding.get_config(setting))
  if setting == "synthetic":
    # 2-core CPU budget: stage 1 as configs/embedding.py; a smaller FFN, a few epochs and a
    # larger lr than the paper's 1e-5 (which needs its 20 epochs of ~200 steps); one normalised
    # eval-transform extraction (no per-epoch re-extraction), wd 5e-4.
    c.nformer.update(ffn=256, epochs=3, lr=3e-4, sets_per_step=1, extract_every_epoch=False,
                     normalize_train=True, weight_decay=5e-4, set_metric="cosine")
    return c
  c.nformer.paper = PAPER[setting]
  return c
