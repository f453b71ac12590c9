"""KPM: Kronecker-product matching with soft warping, self-residual attention and the hourglass
(Shen et al., "End-to-End Deep Kronecker-Product Matching for Person Re-identification", CVPR
2018; docs/methods/kpm.md), and the authors' released single-scale variant (`RandomWalkEmbed`
of YantaoShen/kpm_rw_person_reid; its evaluation-time random walk: `KPMMatcher.walked`).

Notation of the paper (Sec. 3.1): probe map X = {x_i}, gallery map Y = {y_j}, M positions each.
  K_ij = x̄_iᵀ ȳ_j (x̄, ȳ: L2-normalised per position, for matching only),
  β_ij = softmax_j(K_ij / τ_KPM)                                      (Eq. 5, 7)
  Δ_i = x_i − Σ_j β_ij y_j                                            (Eq. 3, 8)
  ã = softmax_i(a_i / τ_RSA), a from two [1×1 conv, BN, ReLU] + 1×1 conv on X   (Eq. 9)
  δ = Σ_i (1 + ã_i) Δ_i                                               (Eq. 10)
  logit = Linear(concat_s BN_s(δ_s²)) over the hourglass scales s      (Sec. 3.1.3, 3.2)

Since δ is linear in the warped map, δ = Σ_i α_i x_i − Σ_j (Σ_i α_i β_ij) y_j: only the M×M
matrix K of a pair exists, never the warped map.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreid.methods.kpm.random_walk import walked_mean
from jaxreid.models import FeatureMapEncoder
from jaxreid.nn.norms import FeatureBatchNorm, l2_normalize

VARIANTS = ("paper", "released")


# ------------------------------------------------------------------------------------------------
# Encoder: backbone stages → hourglass


def _stage_outputs(run):
  """(run(), {"layer2": map, "layer3": map, …}): the output of `run` (which calls the
  torchvision-layout ResNet submodule `backbone`) and the output of the last block of each of the
  backbone's stages, read by intercepting the blocks' calls."""
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    name = context.module.name or ""
    if (context.method_name == "__call__" and context.module.parent is not None
        and getattr(context.module.parent, "name", None) == "backbone"
        and name.startswith("layer")):
      captured[name.split("_")[0]] = out     # blocks run in order: the stage's last one wins
    return out

  with nn.intercept_methods(interceptor):
    final = run()
  return final, captured


class HourglassEncoder(FeatureMapEncoder):
  """Pixels → input normalisation → backbone → the hourglass's `scales` maps (paper Sec. 3.2).

  Scale 1 is the final (layer4) map. Scale s + 1 = bilinear ×2 upsampling of a 1×1 conv
  (`reduce_s`, halving the channels) of scale s, plus a 1×1 conv (`lateral_s`) of the backbone
  map of that size (layer3, then layer2). With one scale this is the plain backbone map
  [B, h, w, C]; with more, the maps are flattened, concatenated per image and viewed as
  [B, T, C_S] rows of the last scale's width C_S (scale s fills M_s·C_s / C_S rows;
  `split_scales` undoes this), so that the tiled scorer handles one array.
  """
  scales: int = 3
  map_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.neck:
      raise ValueError("KPM has no neck; set model.neck = 0.")
    if self.scales == 1:
      return self.neck_output(images, train).astype(jnp.float32).astype(self.map_dtype)
    final, stages = _stage_outputs(lambda: self.neck_output(images, train))
    maps = [final.astype(jnp.float32)]
    for s in range(1, self.scales):
      source = stages.get(f"layer{4 - s}")
      prev = maps[-1]
      b, h, w, c = prev.shape
      if source is None or source.shape[1:3] != (2 * h, 2 * w):
        raise ValueError("The KPM hourglass needs a ResNet ending at layer4 with last stride 2, "
                         "each stage twice the size of the next; set model.final_layer = "
                         "'layer4' and model.last_stride = 2.")
      up = nn.Conv(c // 2, (1, 1), name=f"reduce_{s}")(prev)
      up = jax.image.resize(up, (b, 2 * h, 2 * w, c // 2), "bilinear")
      maps.append(up + nn.Conv(c // 2, (1, 1), name=f"lateral_{s}")(source.astype(jnp.float32)))
    flat = jnp.concatenate([m.reshape(m.shape[0], -1) for m in maps], 1)
    return flat.reshape(flat.shape[0], -1, maps[-1].shape[-1]).astype(self.map_dtype)


def scale_shapes(final_size: tuple[int, int], channels: int, scales: int):
  """(h, w, c) of each hourglass scale: the final map, then ×2 size and ½ channels per scale."""
  h, w = final_size
  return tuple((h * 2**s, w * 2**s, channels // 2**s) for s in range(scales))


def split_scales(features, shapes):
  """Encoder output → [N, M_s, C_s] per scale (a 4-D map is the single scale)."""
  if features.ndim == 4:
    return [features.reshape(features.shape[0], -1, features.shape[-1]).astype(jnp.float32)]
  features = features.reshape(features.shape[0], -1)
  sizes = [h * w * c for h, w, c in shapes]
  if features.shape[-1] != sum(sizes):
    raise ValueError(f"KPM features have {features.shape[-1]} values per image, but the model's "
                     f"scales {list(shapes)} need {sum(sizes)}.")
  out, start = [], 0
  for (h, w, c), size in zip(shapes, sizes):
    out.append(features[:, start:start + size].reshape(-1, h * w, c).astype(jnp.float32))
    start += size
  return out


# ------------------------------------------------------------------------------------------------
# Matching


def matching_weights(x, y, alpha, tau: float, paired: bool):
  """w_j = Σ_i α_i β_ij: how much each gallery position enters the warped, attention-summed map.

  x [P, M, C], y [G, M, C] (raw maps; normalised here for matching), alpha [P, M] →
  [P, G, M] (cross) or [P, M] (paired, P = G)."""
  xn, yn = l2_normalize(x), l2_normalize(y)
  if paired:
    beta = jax.nn.softmax(jnp.einsum("imc,inc->imn", xn, yn) / tau, axis=-1)
    return jnp.einsum("im,imn->in", alpha, beta)
  beta = jax.nn.softmax(jnp.einsum("pmc,gnc->pgmn", xn, yn) / tau, axis=-1)
  return jnp.einsum("pm,pgmn->pgn", alpha, beta)


def kpm_difference(x, y, alpha, tau: float, paired: bool = False):
  """δ = Σ_i α_i (x_i − Σ_j β_ij y_j) (paper Eq. 4/10): [P, G, C] (cross) or [P, C] (paired)."""
  w = matching_weights(x, y, alpha, tau, paired)
  ax = jnp.einsum("pm,pmc->pc", alpha, x)
  if paired:
    return ax - jnp.einsum("in,inc->ic", w, y)
  return ax[:, None] - jnp.einsum("pgn,gnc->pgc", w, y)


def released_difference(probe, gallery, temperature: float, paired: bool = False):
  """`RandomWalkEmbed` (p2g): the probe warped onto the gallery, minus the gallery, averaged
  over positions: mean_i(Σ_j softmax_j(t·ḡ_iᵀ p̄_j) p_j − g_i) → [P, G, C] or [P, C]."""
  pn, gn = l2_normalize(probe), l2_normalize(gallery)
  m = probe.shape[1]
  if paired:
    att = jax.nn.softmax(temperature * jnp.einsum("iac,ibc->iab", gn, pn), axis=-1)
    return jnp.einsum("ib,ibc->ic", att.sum(1), probe) / m - gallery.mean(1)
  att = jax.nn.softmax(temperature * jnp.einsum("gac,pbc->pgab", gn, pn), axis=-1)
  return jnp.einsum("pgb,pbc->pgc", att.sum(2), probe) / m - gallery.mean(1)[None]


class ResidualSelfAttention(nn.Module):
  """α = 1 + softmax over positions of a/τ_RSA, a = conv3(ReLU(BN(conv2(ReLU(BN(conv1(X)))))))
  with 1×1 convs (paper Sec. 3.1.3): [N, M, C] → [N, M]."""
  channels: int = 256
  tau: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool):
    for i in (1, 2):
      x = nn.Dense(self.channels, use_bias=False, name=f"conv{i}")(x)   # a 1×1 conv
      x = nn.relu(FeatureBatchNorm(name=f"bn{i}")(x, train))
    a = nn.Dense(1, name="conv3")(x)[..., 0]
    return 1.0 + jax.nn.softmax(a / self.tau, axis=-1)


def _classifier_init(key, shape, dtype=jnp.float32):
  return 0.001 * jax.random.normal(key, shape, dtype)      # the authors' N(0, 0.001)


class KPMMatcher(nn.Module):
  """Pair logits from KPM encoder features: `__call__(probe [P], gallery [G])` → [P, G];
  `pairs(x [N], y [N])` → [N] for aligned rows (training on sampled pairs).

  shapes: (h, w, c) per scale. variant "paper": per scale δ (above) → square → BN (`bn_s`);
  concatenated → Linear (`classifier`) → one logit. variant "released": one scale, the channels
  cut into `groups` chunks; embed g (`bn_g`, dropout, 2-way `classifier_g`) is applied to the
  squared released difference of every chunk, and the logit is the mean over embeds and chunks
  of (same − different) class scores; `released_scores` gives its 2-way scores for the
  release's random-walk training (objective.py). `normalize`: warp and subtract L2-normalised
  maps (both papers' code: raw maps, normalised only inside K).
  """
  shapes: Sequence[tuple[int, int, int]]
  variant: str = "paper"
  tau: float = 0.05
  tau_rsa: float = 1.0
  rsa_channels: int = 256
  groups: int = 1
  dropout: float = 0.0
  normalize: bool = False

  def setup(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"model.variant={self.variant!r} is unknown; use one of {VARIANTS}.")
    if self.variant == "paper":
      # Submodules rsa_s, bn_s (per scale) and classifier.
      self.rsa = [ResidualSelfAttention(self.rsa_channels, self.tau_rsa)
                  for _ in range(len(self.shapes))]
      self.bn = [FeatureBatchNorm() for _ in range(len(self.shapes))]
      self.classifier = nn.Dense(1)
    else:
      if len(self.shapes) != 1:
        raise ValueError("The released KPM variant matches one scale; set model.scales = 1.")
      if self.shapes[0][2] % self.groups:
        raise ValueError(f"model.groups={self.groups} does not divide the {self.shapes[0][2]} "
                         "channels of the feature map.")
      # Submodules bn_g and classifier_g per embed g.
      self.bn = [FeatureBatchNorm() for _ in range(self.groups)]
      self.classifier = [nn.Dense(2, kernel_init=_classifier_init) for _ in range(self.groups)]
      self.drop = nn.Dropout(self.dropout)

  def __call__(self, probe, gallery, train: bool = False):
    return self._logits(probe, gallery, train, paired=False)

  def pairs(self, x, y, train: bool = False):
    return self._logits(x, y, train, paired=True)

  def _split(self, features):
    """Per-scale [N, M_s, C_s] maps, L2-normalised per position under `normalize` (then the
    warping, the difference and the attention also see unit vectors)."""
    maps = split_scales(features, self.shapes)
    return [l2_normalize(m) for m in maps] if self.normalize else maps

  def differences(self, probe, gallery, train: bool = False, paired: bool = False):
    """The per-scale difference vectors δ_s ([P, G, C_s] or [P, C_s]) of the paper variant."""
    xs, ys = self._split(probe), self._split(gallery)
    return [kpm_difference(x, y, rsa(x, train), self.tau, paired)
            for x, y, rsa in zip(xs, ys, self.rsa)]

  def _logits(self, probe, gallery, train, paired):
    if self.variant == "paper":
      deltas = self.differences(probe, gallery, train, paired)
      feats = jnp.concatenate([bn(d * d, train) for d, bn in zip(deltas, self.bn)], -1)
      return self.classifier(feats)[..., 0]
    logits = []
    for p2g, _ in self.released_scores(probe, gallery, train, paired, gallery_pairs=False):
      logits.append(p2g[..., 1] - p2g[..., 0])
    return jnp.mean(jnp.stack(logits), 0)

  def _embed(self, j: int, difference, train: bool):
    """Embed j of the released variant: 2-way classifier(dropout(BN(δ²)))."""
    d = self.bn[j](difference * difference, train)
    return self.classifier[j](self.drop(d, deterministic=not train or not self.dropout))

  def released_scores(self, probe, gallery, train: bool = False, paired: bool = False,
                      gallery_pairs: bool = True):
    """The released variant's 2-way scores (`RandomWalkKpmNet`, docs/methods/kpm.md): for each
    embed j (outer) and channel chunk i (inner), (probe × gallery [P, G, 2] (paired: [P, 2]) of
    the KPM differences of chunk i, gallery × gallery [G, G, 2] of the differences of the
    average-pooled chunks, or None without `gallery_pairs`), both through embed j."""
    (x,), (y,) = self._split(probe), self._split(gallery)
    c = x.shape[-1] // self.groups
    chunks = [(x[..., i * c:(i + 1) * c], y[..., i * c:(i + 1) * c]) for i in range(self.groups)]
    p2g = [released_difference(xi, yi, 1.0 / self.tau, paired) for xi, yi in chunks]
    g2g = [yi.mean(1)[None] - yi.mean(1)[:, None] for _, yi in chunks]
    return [(self._embed(j, p2g[i], train),
             self._embed(j, g2g[i], train) if gallery_pairs else None)
            for j in range(self.groups) for i in range(self.groups)]

  def _embed_outputs(self, diffs, train: bool = False):
    """Released variant: the 2-way class scores [E·E, …, 2] of every embed h (outer) applied to
    the squared difference of every channel group j (inner), the authors' (h, j) order."""
    return jnp.stack([self._embed(h, d, train) for h in range(self.groups) for d in diffs])

  def walked(self, probe, gallery, alpha: float):
    """Released variant, the authors' evaluation (docs/methods/kpm.md): probe [M…] against its k
    gallery maps [k, M…] → the (same − different) logits [k] after the group-shuffling random
    walk. α = 0 gives `__call__(probe[None], gallery)[0]`."""
    probes = jnp.broadcast_to(probe[None], (gallery.shape[0], *probe.shape))
    return self.walk(self.group_logits(probes, gallery), self.global_features(gallery), alpha)

  def group_logits(self, x, y):
    """Released variant: the (same − different) logits [N, E·E] of aligned pairs x [N, M…],
    y [N, M…], one per (embed h, channel group j), before their mean (`pairs`)."""
    self._check_released()
    (x,), (y,) = self._split(x), self._split(y)
    c = x.shape[-1] // self.groups
    out = self._embed_outputs([released_difference(x[..., j * c:(j + 1) * c],
                                                   y[..., j * c:(j + 1) * c], 1.0 / self.tau,
                                                   paired=True) for j in range(self.groups)])
    return (out[..., 1] - out[..., 0]).T

  def walk(self, group_logits, pooled, alpha: float):
    """One probe's walked logits [k] from its `group_logits` [k, E·E] against k gallery images
    and their pooled maps [k, C] (`global_features`): per (h, j), the gallery–gallery "same"
    logits of embed h on group j of the pooled maps (the authors' g2g branch: no warping) drive
    `random_walk.walked_mean`."""
    self._check_released()
    c = pooled.shape[-1] // self.groups
    chunks = [pooled[:, j * c:(j + 1) * c] for j in range(self.groups)]
    gg = self._embed_outputs([g[None] - g[:, None] for g in chunks])              # [E², k, k, 2]
    return walked_mean(group_logits.T, gg[..., 1], alpha)

  def _check_released(self):
    if self.variant != "released":
      raise ValueError("eval.random_walk_alpha > 0 needs the released KPM variant "
                       "(model.variant = 'released'); set it to 0.")

  def global_features(self, features):
    """The final map average-pooled ([N, C_1]): the first stage of a top-k re-scoring (the
    authors' CascadeEvaluator ranks by the Euclidean distance of these)."""
    return split_scales(features, self.shapes)[0].mean(1)

  def attention(self, probe, gallery):
    """β per scale ([P, G, M_s, M_s], probe position × gallery position), for drawing."""
    xs, ys = split_scales(probe, self.shapes), split_scales(gallery, self.shapes)
    if self.variant == "released":   # the released code warps the probe onto the gallery
      (x,), (y,) = xs, ys
      beta = jax.nn.softmax(jnp.einsum("gac,pbc->pgab", l2_normalize(y), l2_normalize(x))
                            / self.tau, axis=-1)
      return [beta.transpose(0, 1, 3, 2)]
    return [jax.nn.softmax(jnp.einsum("pmc,gnc->pgmn", l2_normalize(x), l2_normalize(y))
                           / self.tau, axis=-1) for x, y in zip(xs, ys)]
