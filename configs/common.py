"""Fields shared by every method's config, and the recipes several configs share.

Each method file starts from `base_config()` (data, backbone, optimiser, evaluation) and adds
only its own fields; docs/methods/<method>.md says which recipe each setting uses."""
import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  # "name" or "name/builder_config"; test is a comma-separated list, each reported separately.
  c.dataset.train = "synthetic_reid/domain_a"
  c.dataset.test = "synthetic_reid/domain_b"
  c.dataset.data_dir = "~/tensorflow_datasets"
  c.dataset.manual_dir = config_dict.placeholder(str)   # downloaded archives (built when missing)
  c.dataset.skip_bad_images = False     # when building: skip (and report) unreadable images

  c.data = ml_collections.ConfigDict()
  c.data.height = 64
  c.data.width = 32
  c.data.sampler = "gs"                 # "gs" | "pk" | "random" | "identity" | "multi_gallery"
  c.data.batch_size = 32
  c.data.num_instances = 4
  # Host input pipeline (grain): threads decode and resize (Pillow releases the GIL), in this
  # process and in num_workers worker processes. −1 picks from the core count: threads alone up to
  # 6 cores, else cores // 4 workers (pipeline.loader_processes). The augmentation itself runs
  # inside the jitted step (jaxreid/data/augment.py).
  c.data.num_threads = -1
  c.data.num_workers = -1
  c.data.gs_pre_epochs = 0              # graph sampler: first epochs with a random PK index (v2.0)
  c.data.gs_rerank = False              # graph sampler: re-ranked class distance (v2.0)
  # Colour jitter is off on synthetic_reid, where clothing colour is most of the identity cue
  # (3 epochs: mAP 5.8 without vs 3.0 with); the paper settings turn it on.
  c.data.augment = ml_collections.ConfigDict(dict(
      pad=4, flip=True, rotate_deg=5.0, color_jitter=False, occlusion=True, random_erasing=0.0))

  c.model = ml_collections.ConfigDict()
  c.model.name = ""                     # the method (jaxreid.registry); set by each config file
  c.model.backbone = "resnet"           # jaxreid.backbones
  c.model.depth = 18
  c.model.width = 32                    # channels of the ResNet stem (64 = standard ResNet)
  c.model.ibn = "b"
  c.model.final_layer = "layer3"
  c.model.last_stride = 2
  c.model.freeze_bn = False
  c.model.neck = 64
  c.model.input_norm = "none"
  c.model.pretrained = config_dict.placeholder(str)  # ImageNet .pth/.safetensors for the backbone

  c.train = ml_collections.ConfigDict()
  c.train.loss = ""                     # one of the method's objectives; set by each config
  c.train.optimizer = "sgd"             # "sgd" (nesterov) | "adam"
  # The synthetic default trains from scratch (no ImageNet weights offline), so the backbone
  # learns at the full, larger lr; the paper settings use lr 0.005 with the backbone at ×0.1.
  c.train.epochs = 12
  c.train.lr = 0.05
  c.train.backbone_lr_mult = 1.0
  c.train.lr_step_epochs = (10,)
  c.train.lr_step_factor = 0.1
  c.train.momentum = 0.9
  c.train.nesterov = True
  c.train.weight_decay = 5e-4
  c.train.clip_norm = 8.0               # per group (backbone+neck, matcher); 0 = off
  c.train.bf16 = False
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 50
  c.train.keep_checkpoints = 2
  c.train.eval_every_epochs = 0         # 0 = only after the last epoch
  c.train.stop_at_step = config_dict.placeholder(int)  # checkpoint and stop (time-limited jobs)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.tile_p = 64
  c.eval.tile_g = 256
  c.eval.max_rank = 50
  # Pairwise matchers: > 0 re-scores only each query's top-k gallery entries of a first stage
  # (−‖p − g‖² of pooled features) and ranks the rest after them (eval.scoring.rescore_top_k).
  c.eval.rescore_top_k = 0
  # KPM's released variant: > 0 applies the authors' group-shuffling random walk (this α) over
  # each query's top eval.rescore_top_k gallery entries (docs/methods/kpm.md); 0 = off.
  c.eval.random_walk_alpha = 0.0
  c.eval.rerank = False                 # k-reciprocal re-ranking (Zhong et al. 2017)
  c.eval.tlift = False                  # temporal lifting (QAConv paper, Sec. 4)
  # Matcher score → re-ranking distance: "sigmoid" = 1 - sigmoid(s/10), "neg" = -s.
  c.eval.distance = "sigmoid"
  c.eval.rerank_k1 = 20
  c.eval.rerank_k2 = 6
  c.eval.rerank_lambda = 0.3
  c.eval.tlift_tau = 100.0              # seconds
  c.eval.tlift_sigma = 200.0            # seconds
  c.eval.tlift_k = 10
  c.eval.tlift_alpha = 0.2
  c.eval.retrieval_top_k = 100          # gallery entries per query in workdir/retrieval.npz; 0 = off
  # Streaming evaluation (docs/evaluation.md): the gallery is encoded and scored in chunks of
  # gallery_chunk images (0: 16 eval batches) against the query features, which stay on the
  # devices up to probes_on_device_mb; stream = False extracts the whole gallery first.
  c.eval.stream = True
  c.eval.gallery_chunk = 0
  c.eval.probes_on_device_mb = 16384
  c.eval.rerank_in_memory_mb = 2048     # a larger gallery-gallery matrix goes to disk in blocks
  c.eval.paper = ml_collections.ConfigDict()  # the paper's numbers for this setting, if any
  return c


def paper_recipe(c: ml_collections.ConfigDict, train: str, paper: dict) -> ml_collections.ConfigDict:
  """The QAConv/TransMatcher papers' common recipe on `train`, tested on the sets of `paper`
  ({test set: {"R1", "mAP"}}): ResNet-50-IBN-b with frozen BN (ImageNet weights through
  model.pretrained) at 384×128, batch 64 with K = 4, SGD lr 0.005 with the backbone at ×0.1,
  15 epochs with a ×0.1 step at 10, bf16."""
  c.dataset.train = train
  c.dataset.test = ",".join(paper)
  c.data.height, c.data.width = 384, 128
  c.data.batch_size, c.data.num_instances = 64, 4
  c.data.augment.update(pad=10, color_jitter=True)
  c.model.update(depth=50, width=64, ibn="b", freeze_bn=True)
  c.train.update(epochs=15, lr=0.005, backbone_lr_mult=0.1, lr_step_epochs=(10,), bf16=True,
                 checkpoint_every_steps=1000)
  c.eval.batch_size = 128
  c.eval.paper = paper
  return c


def pairwise_training(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """In-batch training of a pairwise matcher (QAConv-GS, TransMatcher, Transformer-Cat/-Cross):
  graph sampler, pairwise BCE (`train.loss = "triplet"`: batch-hard triplet on the scores)."""
  c.data.sampler = "gs"
  c.train.loss = "pairwise"
  c.train.triplet_margin = 16.0
  return c


def transformer_fields(c: ml_collections.ConfigDict, d: int = 64, ffn: int = 128,
                       num_layers: int = 3) -> ml_collections.ConfigDict:
  """The Transformer width of the TransMatcher paper's models (TransMatcher and its Table 2
  baselines): neck to d, FFN / MLP width D, N layers, H heads."""
  c.model.neck = d                  # d: neck channels = Transformer width
  c.model.ffn = ffn                 # D: encoder feed-forward and decoder MLP width
  c.model.num_layers = num_layers   # N
  c.model.heads = 1                 # H: attention heads
  c.model.normalize = False         # L2-normalise the neck output (QAConv does; TransMatcher not)
  c.model.map_dtype = "float32"     # of encode()'s maps; "bfloat16" halves feature memory
  c.model.pos_embed = False         # learned positional embedding (paper Table 3)
  return c


def transformer_paper_recipe(c, train: str, paper: dict, d=512, ffn=2048, num_layers=3):
  """`paper_recipe` with the TransMatcher paper's Transformer width and its memory choices."""
  c = paper_recipe(c, train, paper)
  transformer_fields(c, d=d, ffn=ffn, num_layers=num_layers)
  c.train.clip_norm = 4.0
  # A tile's decoder MLP holds tile_p·tile_g·N·2·D floats (64·64·3·2·2048·4 B = 200 MB).
  c.eval.update(batch_size=128, tile_p=64, tile_g=64)
  # Extracted maps are N·h·w·d = 3·24·8·512 values per image; bfloat16 halves that (the matcher
  # multiplies them in bfloat16 under train.bf16 anyway, after an fc1 computed in float32).
  c.model.map_dtype = "bfloat16"
  return c


# TransMatcher paper Table 2: Transformers trained on MSMT17, R1 / mAP (%) on CUHK03-NP, Market;
# d, D, N = 512, 2048, 3, or 128, 512, 2 for the models in TABLE2_SMALL.
TABLE2 = {
    "vit": ((12.0, 12.4), (57.7, 29.8)),
    "vanilla_transformer": ((13.2, 13.3), (54.3, 29.0)),
    "transmatcher": ((23.7, 22.5), (80.1, 52.0)),
    "transformer_cat": ((13.1, 13.2), (53.9, 27.4)),
    "transformer_cross": ((18.9, 19.8), (66.2, 40.1)),
    "transmatcher_small": ((22.5, 21.4), (77.4, 49.3)),
}
TABLE2_SMALL = ("transformer_cat", "transformer_cross", "transmatcher_small")


def table2_recipe(c, model: str):
  """The paper's Table 2 setting of `model` (a TABLE2 key): trained on MSMT17 (train split) with
  the graph sampler, tested on CUHK03-NP (detected) and Market-1501."""
  (cuhk_r1, cuhk_map), (market_r1, market_map) = TABLE2[model]
  paper = {"cuhk03_np/detected": {"R1": cuhk_r1, "mAP": cuhk_map},
           "market1501": {"R1": market_r1, "mAP": market_map}}
  size = dict(d=128, ffn=512, num_layers=2) if model in TABLE2_SMALL else {}
  c = transformer_paper_recipe(pairwise_training(c), "msmt17", paper, **size)
  return c
