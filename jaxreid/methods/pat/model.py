"""PAT's model (paper Sec. 3.1; docs/methods/pat.md): a ViT whose sequence is [cls, part_1, part_2,
part_3, patches], every block under the part-aware attention mask, then BNNeck + a bias-free
classifier on the class token.

Part-aware mask (True = may attend), over N = 4 + h·w tokens:
- the class token and the patches attend to each other and to themselves (all of them);
- the class token attends to the parts and each part to the class token;
- part p attends to itself and to the patches of its region, and those patches to it;
- parts never attend to each other.
Regions are horizontal bands of the h × w grid: rows [0, h/2], [h/4, h/4 + h/2], [h/2, h]
(16 × 8: rows 0–8, 4–12, 8–15), all columns. In training each part's region is a random
sub-rectangle of its band, drawn once per step for the whole batch (the official
`generate_2d_mask`: two distinct row bounds t < b from the band's h/2 + 1 bounds, two distinct
column bounds l < r from the w + 1 bounds, rows t…b and columns l…r inclusive, clipped to the
grid); in evaluation the full band (deterministic), or with `random_test_masks` a random
sub-rectangle per batch as in training (the official forward draws one mask per call, in
evaluation too). Its key is the "mask" rng when the caller gives one, else `test_mask_seed`
folded with a hash of the batch's pixels: each batch gets its own draw, and a run is
reproducible.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxreid import backbones, models
from jaxreid.models import INPUT_NORMS, to_unit_range
from jaxreid.nn.norms import cosine_similarity, l2_normalize

NUM_PARTS = 3


def bands(h: int, w: int) -> np.ndarray:
  """The three bands as [3, 4] (top, bottom, left, right) bounds, inclusive before clipping:
  top = 0, h/4, h/2 (integer parts), bottom = top + h/2, left = 0, right = w."""
  half = int(h / 2)
  return np.array([[top, top + half, 0, w] for top in (0, int(h / 4), int(h / 2))], np.int32)


def random_rectangles(rng, h: int, w: int) -> jax.Array:
  """[3, 4] random (top, bottom, left, right) per part: two distinct bounds, sorted, drawn
  uniformly from each band's rows top…top + h/2 and columns 0…w."""
  out = []
  for p, (top, bottom, left, right) in enumerate(bands(h, w)):
    kr, kc = jax.random.split(jax.random.fold_in(rng, p))
    rows = jnp.sort(jax.random.choice(kr, jnp.arange(top, bottom + 1), (2,), replace=False))
    cols = jnp.sort(jax.random.choice(kc, jnp.arange(left, right + 1), (2,), replace=False))
    out.append(jnp.concatenate([rows, cols]))
  return jnp.stack(out).astype(jnp.int32)


def batch_key(seed: int, images) -> jax.Array:
  """A key of `seed` and the pixels of `images`: different batches (almost surely) get
  different keys, the same batch always the same one."""
  x = jax.lax.bitcast_convert_type(jnp.asarray(images).astype(jnp.float32), jnp.uint32)
  x = x.reshape(-1)
  weights = jnp.arange(x.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jax.random.fold_in(jax.random.key(seed), jnp.sum(x * weights, dtype=jnp.uint32))


def part_mask(rects, h: int, w: int) -> jax.Array:
  """[N, N] bool part-aware attention mask (N = 4 + h·w) of the regions `rects` [3, 4]
  (top, bottom, left, right), inclusive and clipped to the grid; see the module docstring."""
  n = 1 + NUM_PARTS + h * w
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  shared = jnp.ones(n, bool).at[1:1 + NUM_PARTS].set(False)
  mask = shared[:, None] & shared[None, :]
  for p in range(NUM_PARTS):
    t, b, l, r = rects[p, 0], rects[p, 1], rects[p, 2], rects[p, 3]
    region = ((rows >= t) & (rows <= b) & (cols >= l) & (cols <= r)).reshape(-1)
    vec = jnp.zeros(n, bool).at[1 + p].set(True).at[1 + NUM_PARTS:].set(region)
    mask = mask | (vec[:, None] & vec[None, :])
  mask = mask.at[1:1 + NUM_PARTS, 0].set(True).at[0, 1:1 + NUM_PARTS].set(True)
  return mask


class PATEncoder(nn.Module):
  """Pixels → input normalisation → the ViT `backbone` (with part tokens) under the part-aware
  mask → all tokens after the final LayerNorm [B, 4 + h·w, D]."""
  backbone: nn.Module
  input_norm: str = "half"
  random_test_masks: bool = False
  test_mask_seed: int = 0

  @nn.compact
  def __call__(self, images, train: bool = False):
    mean, std = INPUT_NORMS[self.input_norm]
    x = (to_unit_range(images) - jnp.asarray(mean)) / jnp.asarray(std)
    vb = self.backbone
    h = (x.shape[1] - vb.patch) // vb.stride + 1
    w = (x.shape[2] - vb.patch) // vb.stride + 1
    if self.has_rng("mask") and (train or self.random_test_masks):
      rects = random_rectangles(self.make_rng("mask"), h, w)
    elif train:
      rects = random_rectangles(jax.random.key(self.test_mask_seed), h, w)
    elif self.random_test_masks:
      rects = random_rectangles(batch_key(self.test_mask_seed, images), h, w)
    else:
      rects = jnp.asarray(bands(h, w))
    self.sow("intermediates", "part_regions", rects)
    # Evaluation runs in float32 as the official test does; training keeps the module's dtype
    # (bfloat16 under train.bf16, like the official fp16 autocast) in the patch embedding and
    # blocks, with the final LayerNorm in float32 as autocast runs it: the CSL memory and the
    # class token stay float32.
    return vb.tokens(x, train, part_mask(rects, h, w), dtype=None if train else jnp.float32,
                     norm_dtype=jnp.float32)


class PATModel(nn.Module):
  """`encode` → the L2-normalised last-layer class token (after the final LayerNorm, before the
  BNNeck: the official TEST.NECK_FEAT 'before' with FEAT_NORM); `match` → cosine [P, G];
  `train_outputs` → (class token [B, D], part tokens [B, 3, D], logits)."""
  encoder: nn.Module
  head: nn.Module

  def encode(self, images, train: bool = False):
    tokens = self.encoder(images, train)
    self.head(tokens[:, 0].astype(jnp.float32), train)   # keeps the head's variables in init
    return l2_normalize(tokens[:, 0].astype(jnp.float32))

  def train_outputs(self, images):
    tokens = self.encoder(images, True).astype(jnp.float32)
    cls, _, logits = self.head(tokens[:, 0], True)
    return cls, tokens[:, 1:1 + NUM_PARTS], logits

  def match(self, probe, gallery, train: bool = False):
    return cosine_similarity(probe, gallery)

  def __call__(self, images, train: bool = False):
    return self.encode(images, train)


def build(config) -> "PATModel":
  """The PAT model of config.model for config.data.height × width."""
  m = config.model
  if m.get("backbone") != "vit":
    raise ValueError(f"PAT runs on a ViT: set model.backbone='vit' (got {m.get('backbone')!r}).")
  if int(m.get("part_tokens", 0)) != NUM_PARTS:
    raise ValueError(f"PAT has {NUM_PARTS} part tokens: set model.part_tokens={NUM_PARTS}.")
  d = config.data
  size = (int(m.get("input_height", d.height)), int(m.get("input_width", d.width)))
  if size != (d.height, d.width):
    raise ValueError(f"model.input_height × input_width = {size[0]}×{size[1]} must equal "
                     f"data.height × width = {d.height}×{d.width} (the position grid's input).")
  vit = backbones.get(m).build(m, models.compute_dtype(config))
  encoder = PATEncoder(vit, m.get("input_norm", "half"), bool(m.get("random_test_masks", False)),
                       int(m.get("test_mask_seed", 0)))
  head = models.EmbeddingHead(None, 0, int(m.get("num_classes", 0)))
  return PATModel(encoder=encoder, head=head)
