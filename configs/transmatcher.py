"""TransMatcher: Transformer encoders + simplified matching decoder, trained like QAConv-GS
(graph sampler, pairwise BCE; METHODS.md).

Default: a small model on the embedded synthetic_reid (train domain_a, test domain_b), a few
minutes on a 2-core CPU. `configs/transmatcher.py:<setting>` selects the paper's full settings.
"""
from configs.common import base_config

PAPER = {  # R1 / mAP (%), TransMatcher paper Table 1
    "market_msmt": {"R1": 47.3, "mAP": 18.4},
    "market_cuhk": {"R1": 22.2, "mAP": 21.4},
    "msmt17_market": {"R1": 80.1, "mAP": 52.0},
    "msmt17_all": {"R1": 82.6, "mAP": 58.4},
    "randperson": {"R1": 77.3, "mAP": 49.1},
}
SETTINGS = {  # setting → (train, test, paper key)
    "market": ("market1501", "msmt17", "market_msmt"),
    "market_cuhk": ("market1501", "cuhk03_np", "market_cuhk"),
    "msmt17": ("msmt17", "market1501", "msmt17_market"),
    "msmt17_all": ("msmt17/all", "market1501", "msmt17_all"),
    "randperson": ("randperson", "market1501", "randperson"),
}


def transmatcher_fields(c, d=64, ffn=128, num_layers=3):
  c.model.name = "transmatcher"
  c.model.neck = d                  # d: neck channels = Transformer width
  c.model.ffn = ffn                 # D: encoder feed-forward and decoder MLP width
  c.model.num_layers = num_layers   # N: decoder layers
  # N - 1 (official: the neck output feeds decoder 1) or N (paper Fig. 1: decoder n reads enc_n).
  c.model.encoders = num_layers - 1
  c.model.heads = 1                 # H: encoder attention heads
  c.model.normalize = False         # L2-normalise the neck output (QAConv does; TransMatcher not)
  c.model.map_dtype = "float32"     # of encode()'s maps; "bfloat16" halves feature memory
  # Paper Table 3 switches.
  c.model.fc1 = True
  c.model.bn1 = True
  c.model.mlp_head1 = True
  c.model.prior_embed = True
  c.model.pos_embed = False
  return c


def paper_settings(c, train, test, paper_key):
  c.dataset.train, c.dataset.test = train, test
  c.data.height, c.data.width = 384, 128
  c.data.batch_size, c.data.num_instances = 64, 4
  c.data.augment.update(pad=10, color_jitter=True)
  c.model.update(depth=50, width=64, ibn="b", freeze_bn=True)
  transmatcher_fields(c, d=512, ffn=2048, num_layers=3)
  epochs, step = (4, 2) if train == "randperson" else (15, 10)
  c.train.update(epochs=epochs, lr=0.005, backbone_lr_mult=0.1, lr_step_epochs=(step,),
                 clip_norm=4.0, bf16=True, checkpoint_every_steps=1000)
  # A tile's decoder MLP holds tile_p·tile_g·N·2·D floats (64·64·3·2·2048·4 B = 200 MB).
  c.eval.update(batch_size=128, tile_p=64, tile_g=64)
  # Extracted maps are N·h·w·d = 3·24·8·512 values per image; bfloat16 halves that (the matcher
  # multiplies them in bfloat16 under train.bf16 anyway, after an fc1 computed in float32).
  c.model.map_dtype = "bfloat16"
  c.eval.paper = PAPER[paper_key]
  return c


def get_config(setting: str = "synthetic"):
  c = base_config()
  c.train.loss = "pairwise"
  c.data.sampler = "gs"
  c.train.clip_norm = 4.0
  transmatcher_fields(c)
  if setting == "synthetic":
    c.train.update(epochs=4, lr_step_epochs=(3,))   # ~5 min on 2 CPU cores
    return c
  if setting in SETTINGS:
    return paper_settings(c, *SETTINGS[setting])
  raise ValueError(f"configs/transmatcher.py has no setting {setting!r}; use synthetic or one of "
                   f"{sorted(SETTINGS)}.")
