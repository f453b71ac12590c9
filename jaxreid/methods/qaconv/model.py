"""QAConv: query-adaptive convolution matching of two feature maps (Liao & Shao, ECCV 2020;
docs/methods/qaconv.md)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreid.nn.norms import ScalarBatchNorm


def pooled_similarities(probe, gallery, gallery_chunk: int = 8):
  """Max-pooled location similarities of every probe × gallery pair.

  probe [P, h, w, d], gallery [G, h, w, d] → (by_probe_location, by_gallery_location), each
  [P, G, hw]: the first maximises over gallery locations, the second over probe locations.
  Gallery maps are taken `gallery_chunk` at a time, so only [P, chunk, hw, hw] similarities
  exist at once (1.8× faster than one einsum on CPU, and far less memory).
  """
  p = probe.reshape(probe.shape[0], -1, probe.shape[-1])
  g = gallery.reshape(gallery.shape[0], -1, gallery.shape[-1])

  def one_gallery(gi):  # [hw, d]
    s = jnp.einsum("ptd,rd->ptr", p, gi, preferred_element_type=jnp.float32)
    return s.max(axis=2), s.max(axis=1)

  by_probe, by_gallery = jax.lax.map(one_gallery, g, batch_size=min(gallery_chunk, g.shape[0]))
  return by_probe.transpose(1, 0, 2), by_gallery.transpose(1, 0, 2)


def correspondences(probe, gallery):
  """Argmax locations of both poolings (flattened y*w+x indices), for drawing matches.

  Returns dict with `probe_to_gallery` [P, G, hw] (best gallery location for each probe
  location), `gallery_to_probe` [P, G, hw], and the matching similarities.
  """
  p = probe.reshape(probe.shape[0], -1, probe.shape[-1])
  g = gallery.reshape(gallery.shape[0], -1, gallery.shape[-1])
  s = jnp.einsum("ptd,grd->pgtr", p, g, preferred_element_type=jnp.float32)
  return {"probe_to_gallery": s.argmax(3), "probe_to_gallery_score": s.max(3),
          "gallery_to_probe": s.argmax(2), "gallery_to_probe_score": s.max(2)}


class QAConv(nn.Module):
  """Pair logits [P, G] from L2-normalised feature maps.

  head "v2.1" (default): scalar BN over all pooled values → shared Linear(hw→1) per direction →
  sum of directions → scalar BN. head "v1": scalar BN → Linear(2hw→1) over the concatenation
  [by gallery location, by probe location] (the official order) → scalar BN.
  """
  height: int
  width: int
  head: str = "v2.1"

  @nn.compact
  def __call__(self, probe, gallery, train: bool = False):
    if self.head not in ("v2.1", "v1"):
      raise ValueError(f"model.head={self.head!r} is unknown; use 'v2.1' or 'v1'.")
    hw = self.height * self.width
    if probe.shape[1] * probe.shape[2] != hw or gallery.shape[1:] != probe.shape[1:]:
      raise ValueError(f"QAConv was built for {self.height}×{self.width} feature maps; got probe "
                       f"{probe.shape[1:3]} and gallery {gallery.shape[1:3]}.")
    by_probe, by_gallery = pooled_similarities(probe, gallery)
    pooled = jnp.stack([by_probe, by_gallery], axis=2)            # [P, G, 2, hw]
    pooled = ScalarBatchNorm(name="bn")(pooled, train)
    if self.head == "v2.1":
      fc = nn.Dense(1, kernel_init=nn.initializers.constant(1.0 / hw), name="fc")
      logits = fc(pooled)[..., 0].sum(-1)                           # [P, G]
    else:
      bound = (2 * hw) ** -0.5  # PyTorch's default Linear init, as the official v1
      uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
          key, shape, dtype, -bound, bound)
      fc = nn.Dense(1, kernel_init=uniform, bias_init=uniform, name="fc")
      logits = fc(pooled[:, :, ::-1].reshape(pooled.shape[:2] + (2 * hw,)))[..., 0]
    return ScalarBatchNorm(name="logit_bn")(logits, train)
