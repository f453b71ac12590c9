"""KPM (CVPR 2018): Kronecker-product matching, soft warping and self-residual attention at the
three scales of an hourglass on a ResNet, trained on sampled pairs with BCE; and the authors'
released single-scale variant, whose checkpoints load. docs/methods/kpm.md."""
import numpy as np

from jaxreid import models
from jaxreid.backbones.resnet import stage_channels
from jaxreid.methods import Method
from jaxreid.methods.kpm import convert, model, objective


def shapes(config) -> tuple:
  """(h, w, c) of each matched scale of config.model at config.data.height × width."""
  m = config.model
  final = models.feature_map_size(m, config.data.height, config.data.width)
  channels = stage_channels(m.depth, m.get("width", 64))[int(m.final_layer[-1]) - 1]
  return model.scale_shapes(final, channels, m.scales)


def build(config) -> models.PairwiseModel:
  m = config.model
  if m.variant not in model.VARIANTS:
    raise ValueError(f"model.variant={m.variant!r} is unknown; use one of {model.VARIANTS}.")
  if m.scales not in (1, 2, 3):
    raise ValueError(f"model.scales={m.scales} must be 1, 2 or 3.")
  if m.scales > 1 and (m.final_layer != "layer4" or m.get("last_stride", 2) != 2):
    raise ValueError("The KPM hourglass needs model.final_layer = 'layer4' and "
                     "model.last_stride = 2 (each scale twice the size of the one before).")
  train = config.get("train") or {}
  alpha = train.get("rw_alpha", 0.0)   # (I − αA) of the random walk is singular at α = 1
  if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 0.999):
    raise ValueError(f"train.rw_alpha={alpha!r} must be a finite number in [0, 0.999] (the "
                     "random walk's α, below 1).")
  if train.get("loss") == "random_walk" and (
      m.variant != "released" or train.get("pos_per_anchor") != config.data.num_instances - 1):
    raise ValueError("train.loss = 'random_walk' trains the released variant on groups of "
                     "data.num_instances images: set model.variant = 'released' and "
                     "train.pos_per_anchor = data.num_instances - 1.")
  encoder = model.HourglassEncoder(**models.encoder_fields(config), normalize=False,
                                   scales=m.scales, map_dtype=np.dtype(m.map_dtype))
  matcher = model.KPMMatcher(shapes(config), variant=m.variant, tau=m.tau, tau_rsa=m.tau_rsa,
                             rsa_channels=m.rsa_channels, groups=m.groups, dropout=m.dropout,
                             normalize=m.normalize)
  return models.PairwiseModel(encoder=encoder, matcher=matcher)


def correspondences(variables, probe, gallery) -> dict:
  """Where each probe position's KPM attention β points (its argmax over gallery positions,
  paper Eq. 5) and back, with the cosine similarity there, at every scale.

  The standard keys (probe_to_gallery, probe_to_gallery_score, gallery_to_probe,
  gallery_to_probe_score; [1, P, G, M_1]) hold scale 1, the final map, which `--mode=visualize`
  draws; `scale{s}_…` hold scale s = 1, 2, … ([P, G, M_s]). The argmax of β does not depend on
  τ_KPM; the released variant's β runs the other way (over probe positions for each gallery
  position): its argmax is gallery_to_probe."""
  matcher = variables["params"]["matcher"]
  probe, gallery = np.asarray(probe, np.float32), np.asarray(gallery, np.float32)
  if probe.ndim == 4:
    xs = [probe.reshape(len(probe), -1, probe.shape[-1])]
    ys = [gallery.reshape(len(gallery), -1, gallery.shape[-1])]
  else:
    scales = sum(k.startswith("rsa_") for k in matcher)
    c1 = int(np.shape(matcher["rsa_0"]["conv1"]["kernel"])[0])
    m1 = probe[0].size // (c1 * (2**scales - 1))
    shape_list = [(m1 * 4**s, 1, c1 // 2**s) for s in range(scales)]
    xs = [np.asarray(a) for a in model.split_scales(probe, shape_list)]
    ys = [np.asarray(a) for a in model.split_scales(gallery, shape_list)]
  out = {}
  for s, (x, y) in enumerate(zip(xs, ys), start=1):
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    k = np.einsum("pmc,gnc->pgmn", unit(x), unit(y))
    out.update({f"scale{s}_probe_to_gallery": k.argmax(3), f"scale{s}_probe_to_gallery_score":
                k.max(3), f"scale{s}_gallery_to_probe": k.argmax(2),
                f"scale{s}_gallery_to_probe_score": k.max(2)})
  for key in ("probe_to_gallery", "probe_to_gallery_score", "gallery_to_probe",
              "gallery_to_probe_score"):
    out[key] = out[f"scale1_{key}"][None]
  return out


def describe(m) -> str:
  if m.variant == "released":
    return f"released variant, groups {m.groups}, τ {m.tau:g}"
  return f"{m.scales} scale(s), τ_KPM {m.tau:g}, τ_RSA {m.tau_rsa:g}, RSA {m.rsa_channels}"


METHOD = Method(
    name="kpm", kind="pairwise", build=build,
    objectives={"pairs": objective.SAMPLED_PAIRS, "random_walk": objective.RANDOM_WALK},
    convert=convert.kpm_from_torch, detect=convert.detect, export=convert.kpm_to_torch,
    correspondences=correspondences, describe=describe)
