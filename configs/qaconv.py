"""QAConv (ECCV 2020): class-memory training with the focal loss (docs/methods/qaconv.md).

Default: a small model on the embedded synthetic_reid (its own tuned recipe). `configs/qaconv.py:
<setting>` selects:

- `:market`, `:duke`: the ECCV recipe, i.e. official `main.py` at tag v1.0-eccv, which gave the
  QAConv-50 numbers they cite. Plain ResNet-50 (no IBN, torchvision ImageNet weights via
  model.pretrained) with BN trained; layer3 → 3×3 neck conv without bias → BatchNorm2d, 128
  channels (24×8×128 maps); head v1 (scalar BN over the whole score matrix, Linear(2hw→1),
  scalar BN); class memory [C, 24, 8, 128] with the focal loss (γ = 2) summed over all C classes,
  unfilled (zero) memories included; random sampler, batch 32, 384×128, [0, 1] pixels; flip +
  random occlusion only; SGD (Nesterov 0.9, wd 5e-4) lr 0.01, backbone ×0.1, no clipping; 60
  epochs with a ×0.1 step at 40; float32.
- `:market_hybrid`, `:duke_hybrid`: the previous paper-recipe hybrid (no official counterpart,
  no paper numbers): ResNet-50-IBN-b with frozen BN, neck conv with bias, head v2.1, class memory
  masked to filled classes, batch 32, pad + flip + rotation + colour jitter + occlusion, lr 0.005
  (backbone ×0.1), 15 epochs with a step at 10, bfloat16.
"""
import ml_collections

from configs.common import base_config, paper_recipe

PAPER = {  # R1 / mAP (%) of QAConv-50 (ECCV 2020, Table 3) per (training set, test set)
    "market1501": {"dukemtmc_reid": {"R1": 48.8, "mAP": 28.7}},
    "dukemtmc_reid": {"market1501": {"R1": 58.6, "mAP": 27.2}},
}
TRAIN_SETS = {"market": "market1501", "duke": "dukemtmc_reid"}


def qaconv_fields(c):
  c.model.name = "qaconv"
  c.model.head = "v2.1"             # "v2.1": shared Linear(hw) per direction; "v1": Linear(2hw)
  c.model.neck_bn = False           # True: bias-free neck conv + BatchNorm2d (official ≤ v2.0)
  return c


def eccv_recipe(c, train: str):
  """Official main.py at tag v1.0-eccv on `train`, tested on the other set of PAPER."""
  c.dataset.train = train
  c.dataset.test = ",".join(PAPER[train])
  c.data.update(height=384, width=128, batch_size=32, sampler="random")
  # T.RandomHorizontalFlip, T.Resize (bicubic), T.RandomOcclusion(0, 0.8), T.ToTensor: nothing else.
  c.data.augment.update(pad=0, flip=True, rotate_deg=0.0, color_jitter=False, occlusion=True,
                        random_erasing=0.0)
  c.model.update(depth=50, width=64, ibn="none", freeze_bn=False, final_layer="layer3",
                 neck=128, neck_bn=True, head="v1", input_norm="none")
  c.train.update(loss="memory", focal_gamma=2.0, memory_mask_invalid=False, optimizer="sgd",
                 lr=0.01, backbone_lr_mult=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 epochs=60, lr_step_epochs=(40,), lr_step_factor=0.1, clip_norm=0.0, bf16=False,
                 checkpoint_every_steps=1000)
  c.eval.batch_size = 128
  c.eval.paper = PAPER[train]
  return c


def hybrid_recipe(c, train: str):
  """The common paper recipe with class memory (no official counterpart; no paper numbers)."""
  c = paper_recipe(c, train, PAPER[train])
  c.data.batch_size = 32
  c.model.neck = 128
  c.train.clip_norm = 0.0
  c.eval.paper = ml_collections.ConfigDict()
  return c


def get_config(setting: str = "synthetic"):
  c = qaconv_fields(base_config())
  c.train.loss = "memory"
  c.train.focal_gamma = 2.0
  c.train.memory_mask_invalid = True   # sum the loss over filled memories only (official ≥ v1.1)
  c.data.sampler = "random"   # every image once per epoch, as the official code
  # From scratch on synthetic_reid the class memory needs a gentler lr and clipping, else the
  # focal loss collapses to constant logits (PK sampling: stale memories, same collapse).
  c.train.update(lr=0.01, clip_norm=8.0, epochs=20, lr_step_epochs=(15,))
  if setting == "synthetic":
    return c
  if setting in TRAIN_SETS:
    return eccv_recipe(c, TRAIN_SETS[setting])
  if setting.endswith("_hybrid") and setting[:-len("_hybrid")] in TRAIN_SETS:
    return hybrid_recipe(c, TRAIN_SETS[setting[:-len("_hybrid")]])
  raise ValueError(f"configs/qaconv.py has no setting {setting!r}; use synthetic, market, duke, "
                   "market_hybrid or duke_hybrid.")
