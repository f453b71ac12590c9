"""TransMatcher: Transformer encoders + simplified matching decoder, trained like QAConv-GS
(graph sampler, pairwise BCE; METHODS.md).

Default: a small model on the embedded synthetic_reid (train domain_a, test domain_b), a few
minutes on a 2-core CPU. `configs/transmatcher.py:<setting>` selects the paper's full settings.
"""
from configs.common import base_config, paper_recipe

PAPER = {  # R1 / mAP (%) of TransMatcher (paper Table 1) per setting: training set, test sets
    "market": ("market1501", {"cuhk03_np/detected": {"R1": 22.2, "mAP": 21.4},
                              "msmt17": {"R1": 47.3, "mAP": 18.4}}),
    "msmt17": ("msmt17", {"market1501": {"R1": 80.1, "mAP": 52.0}}),
    "msmt17_all": ("msmt17/all", {"market1501": {"R1": 82.6, "mAP": 58.4}}),
    "randperson": ("randperson", {"market1501": {"R1": 77.3, "mAP": 49.1}}),
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


def paper_settings(c, train, paper):
  c = paper_recipe(c, train, paper)
  transmatcher_fields(c, d=512, ffn=2048, num_layers=3)
  if train == "randperson":
    c.train.update(epochs=4, lr_step_epochs=(2,))
  c.train.clip_norm = 4.0
  # A tile's decoder MLP holds tile_p·tile_g·N·2·D floats (64·64·3·2·2048·4 B = 200 MB).
  c.eval.update(batch_size=128, tile_p=64, tile_g=64)
  # Extracted maps are N·h·w·d = 3·24·8·512 values per image; bfloat16 halves that (the matcher
  # multiplies them in bfloat16 under train.bf16 anyway, after an fc1 computed in float32).
  c.model.map_dtype = "bfloat16"
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
  if setting in PAPER:
    return paper_settings(c, *PAPER[setting])
  raise ValueError(f"configs/transmatcher.py has no setting {setting!r}; use synthetic or one of "
                   f"{sorted(PAPER)}.")
