"""Image transforms: evaluation resizing on the host, training augmentation split in two.

Training augmentation runs as JAX trainers run cheap per-image ops (big_vision): the host decodes,
resizes and draws each slot's random factors (`draw`, NumPy, a few microseconds), and `apply`
performs pad + crop, flip, rotation, colour jitter, occlusion and random erasing for the whole
batch inside the jitted step. The factors are drawn exactly as the official torchvision
transforms draw them, and `apply` computes each transform as Pillow does (which those transforms
call): geometry bit-exactly (Pillow's 16.16 fixed-point nearest-neighbour affine), colour in
float32 with Pillow's 8-bit HSV hue and saturation as lookup tables (docs/README.md,
"Input scaling and augmentation").
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


RESIZE = {"bicubic": Image.Resampling.BICUBIC,   # QAConv / TransMatcher
          "bilinear": Image.Resampling.BILINEAR}  # torchvision T.Resize's default (reid-strong-baseline)


def resize_image(image: np.ndarray, height: int, width: int,
                 method: str = "bicubic") -> np.ndarray:
  """`image` resized to (height, width) with Pillow (`method`: bicubic or bilinear); the input
  itself when it already has that size."""
  if method not in RESIZE:
    raise ValueError(f"data.resize={method!r} is unknown; use one of {sorted(RESIZE)}.")
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), RESIZE[method]), np.uint8)


def eval_transform(image: np.ndarray, *, height: int, width: int,
                   resize: str = "bicubic") -> np.ndarray:
  """The evaluation input (and the training input before `apply`): `image` resized to
  (height, width) with interpolation `resize` (data.resize)."""
  return resize_image(image, height, width, resize)


# ------------------------------------------------------------------ host: the random factors

ERASE_FILL = (125, 123, 114)  # RandomErasing's default mean (0.4914, 0.4822, 0.4465) × 255
# reid-strong-baseline passes PIXEL_MEAN (0.485, 0.456, 0.406) and erases *after* Normalize, so the
# erased pixels hold PIXEL_MEAN in normalised units: pixel = (mean + PIXEL_MEAN · std) · 255,
# rounded to uint8 here (docs/methods/embedding.md).
_MEAN, _STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
ERASE_FILLS = {"pixels": ERASE_FILL,
               "after_normalize": tuple(int(v) for v in np.round((_MEAN + _MEAN * _STD) * 255))}
OCCLUSION_FILL = (255, 255, 255)
JITTER_RANGE, HUE_RANGE = (0.5, 2.0), 0.1   # ColorJitter(0.5, 0.5, 0.5, 0.1) factors: [0.5, 2]


def check_options(augment: dict) -> None:
  """A ValueError naming the data.augment field that `draw` cannot use."""
  unknown = set(augment) - {"pad", "flip", "rotate_deg", "color_jitter", "occlusion",
                            "random_erasing", "erase_fill"}
  if unknown:
    raise ValueError(f"data.augment has unknown fields {sorted(unknown)}; it takes pad, flip, "
                     "rotate_deg, color_jitter, occlusion, random_erasing and erase_fill.")
  fill = augment.get("erase_fill", "pixels")
  if fill not in ERASE_FILLS:
    raise ValueError(f"data.augment.erase_fill={fill!r} is unknown; use one of "
                     f"{sorted(ERASE_FILLS)}.")
  if not 0 <= float(augment.get("rotate_deg", 0.0)) < 90:
    raise ValueError(f"data.augment.rotate_deg={augment['rotate_deg']} must be in [0, 90).")


def draw(rng: np.random.Generator, *, height: int, width: int, pad: int = 10, flip: bool = True,
         rotate_deg: float = 5.0, color_jitter: bool = True, occlusion: bool = True,
         random_erasing: float = 0.0, erase_fill: str = "pixels") -> dict[str, np.ndarray]:
  """One slot's factors for `apply`, drawn from `rng` in the order of the official transforms:
  Pad(pad) + RandomCrop offsets, RandomHorizontalFlip (p = 0.5), RandomRotation(±rotate_deg),
  ColorJitter (a random order of brightness, contrast, saturation in [0.5, 2] and hue in ±0.1),
  QAConv's RandomOcclusion (a white square, side in [1, 0.8 · width]), RandomErasing with
  probability `random_erasing` (area 2–40 %, aspect in [0.3, 1/0.3], 100 attempts).

  Only the enabled transforms have keys, so every slot of a batch has the same structure."""
  out = {}
  if pad > 0:
    top, left = rng.integers(0, 2 * pad + 1, 2)
    out["shift"] = np.array([top - pad, left - pad], np.int32)
  if flip:
    out["flip"] = np.bool_(rng.random() < 0.5)
  if rotate_deg > 0:
    out["affine"] = rotation_coefficients(rng.uniform(-rotate_deg, rotate_deg), height, width)
  if color_jitter:
    order = rng.permutation(4)
    factors = np.ones(3, np.float32)
    hue = 0
    for op in order:
      if op < 3:
        factors[op] = rng.uniform(*JITTER_RANGE)
      else:   # torchvision: the shift in turns, added to Pillow's 8-bit hue
        hue = int(round(rng.uniform(-HUE_RANGE, HUE_RANGE) * 255))
    out.update(jitter_order=order.astype(np.int32), jitter=factors, hue=np.int32(hue))
  boxes, fills = [], []
  if occlusion:
    side = int(rng.integers(1, max(1, min(int(0.8 * width), height)) + 1))
    boxes.append((int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)),
                  side, side))
    fills.append(OCCLUSION_FILL)
  if random_erasing:
    box = (0, 0, 0, 0)
    if rng.random() < random_erasing:
      box = _erasing_box(rng, height, width)
    boxes.append(box)
    fills.append(ERASE_FILLS[erase_fill])
  if boxes:
    out["boxes"] = np.array(boxes, np.int32)
    out["box_fills"] = np.array(fills, np.uint8)
  return out


def _erasing_box(rng, height: int, width: int, area=(0.02, 0.4), aspect: float = 0.3,
                 attempts: int = 100) -> tuple[int, int, int, int]:
  """Random erasing's rectangle (y, x, h, w) (Zhong et al. 2020); (0, 0, 0, 0) when no draw fits."""
  for _ in range(attempts):
    target = rng.uniform(*area) * height * width
    ratio = rng.uniform(aspect, 1 / aspect)
    h, w = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
    if 0 < h < height and 0 < w < width:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  return 0, 0, 0, 0


def rotation_coefficients(angle: float, height: int, width: int) -> np.ndarray:
  """int32 [6]: Pillow's 16.16 fixed-point coefficients of Image.rotate(angle) (counter-clockwise
  degrees about the centre, output → input) on a height × width image: column x of row y reads
  input pixel ((a2 + y·a1 + x·a0) >> 16, (a5 + y·a4 + x·a3) >> 16)."""
  angle = angle % 360.0
  if angle == 0:    # Pillow copies the image
    return np.array([65536, 0, 32768, 0, 65536, 32768], np.int32)
  theta = -math.radians(angle)
  a, b = round(math.cos(theta), 15), round(math.sin(theta), 15)
  d, e = round(-math.sin(theta), 15), round(math.cos(theta), 15)
  cx, cy = width / 2, height / 2
  c = a * -cx + b * -cy + 0.0 + cx
  f = d * -cx + e * -cy + 0.0 + cy

  def fix(v):
    return math.floor(v * 65536.0 + 0.5)

  return np.array([fix(a), fix(b), fix(c + a * 0.5 + b * 0.5),
                   fix(d), fix(e), fix(f + d * 0.5 + e * 0.5)], np.int32)


# ----------------------------------------------------------- device: the batched transforms

def apply(images: jax.Array, factors: dict) -> jax.Array:
  """uint8 [B, H, W, 3] `images` (resized) transformed by each slot's `draw` factors [B, …]:
  geometry (pad + crop, flip, rotation: one gather), colour jitter, then the boxes (occlusion,
  erasing). Transforms whose keys are absent are skipped. Jit-compatible; no randomness of its
  own, so resumed and multi-host runs see the same images."""
  if not factors:
    return images
  return jax.vmap(_apply_one)(images, factors)


def _apply_one(image, f):
  height, width = image.shape[:2]
  if {"shift", "flip", "affine"} & f.keys():
    image = _geometry(image, f.get("shift"), f.get("flip"), f.get("affine"))
  if "jitter" in f:
    image = _jitter(image.astype(jnp.float32), f["jitter_order"], f["jitter"], f["hue"])
    image = image.astype(jnp.uint8)
  if "boxes" in f:
    ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    for box, fill in zip(f["boxes"], f["box_fills"]):   # later boxes drawn over earlier ones
      y, x, h, w = box[0], box[1], box[2], box[3]
      inside = (ys >= y) & (ys < y + h) & (xs >= x) & (xs < x + w)
      image = jnp.where(inside[..., None], fill, image)
  return image


def _geometry(image, shift, flip, affine):
  """The output pixel (y, x) of crop → flip → rotate, read from `image` with one gather; zero
  where it falls in the padding or outside the rotated image (Pillow's fill)."""
  height, width = image.shape[:2]
  y, x = jnp.mgrid[:height, :width].astype(jnp.int32)
  valid = jnp.ones((height, width), bool)
  if affine is not None:    # Pillow's affine_fixed: integer arithmetic, so exact
    xx = affine[2] + y * affine[1] + x * affine[0]
    yy = affine[5] + y * affine[4] + x * affine[3]
    x, y = jnp.right_shift(xx, 16), jnp.right_shift(yy, 16)
    valid = (x >= 0) & (x < width) & (y >= 0) & (y < height)
  if flip is not None:
    x = jnp.where(flip, width - 1 - x, x)
  if shift is not None:    # the crop window's offset into the zero-padded image, less the pad
    y, x = y + shift[0], x + shift[1]
    valid &= (x >= 0) & (x < width) & (y >= 0) & (y < height)
  pixels = image[jnp.clip(y, 0, height - 1), jnp.clip(x, 0, width - 1)]
  return jnp.where(valid[..., None], pixels, jnp.zeros_like(pixels))


def _luma(image):
  """Pillow's RGB → L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, integer-valued float."""
  rgb = image.astype(jnp.int32)
  return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000)
          >> 16).astype(jnp.float32)


def _blend(degenerate, image, alpha):
  """Pillow's Image.blend on uint8 values (ImageEnhance): degenerate + α (image − degenerate),
  clipped and truncated."""
  return jnp.floor(jnp.clip(degenerate + alpha * (image - degenerate), 0.0, 255.0))


def _jitter(image, order, factors, hue):
  """ColorJitter in the slot's order: brightness (blend with black), contrast (with the rounded
  mean luma), saturation (with the luma image), hue (Pillow's 8-bit HSV, hue + `hue` mod 256).
  The three blends before and after the hue step are each applied where the order puts them."""
  hue_at = jnp.argmax(order == 3)

  def blend_at(image, position):
    op = order[position]
    luma = _luma(image)
    n = luma.size
    mean = jnp.floor((2 * jnp.sum(luma.astype(jnp.int32)) + n) / (2 * n))  # int(mean + 0.5)
    degenerate = jnp.select([op == 0, op == 1], [jnp.zeros_like(luma), jnp.full_like(luma, mean)],
                            luma)[..., None]
    return _blend(degenerate, image, factors[jnp.minimum(op, 2)])

  for position in range(4):
    image = jnp.where(position < hue_at, blend_at(image, position), image)
  image = _shift_hue(image, hue)
  for position in range(4):
    image = jnp.where(position > hue_at, blend_at(image, position), image)
  return image


def _shift_hue(image, shift):
  """RGB → Pillow's 8-bit HSV, hue + shift mod 256, → RGB (Convert.c rgb2hsv / hsv2rgb)."""
  hue_table, sat_table = (jnp.asarray(t) for t in _hsv_tables())
  rgb = image.astype(jnp.int32)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = jnp.maximum(r, jnp.maximum(g, b))
  chroma = v - jnp.minimum(r, jnp.minimum(g, b))
  h = hue_table[(r - g + 255) * 511 + (g - b + 255)].astype(jnp.int32)
  s = sat_table[v * 256 + chroma].astype(jnp.int32)
  h = (h + shift) % 256
  # hsv2rgb: sector i, f its remainder (float), fs = s / 255 (float); p, q, t rounded half up
  hf = h.astype(jnp.float32)
  i = jnp.floor(hf * 6.0 / 255.0)
  frac = hf * 6.0 / 255.0 - i
  fs = s.astype(jnp.float32) / 255.0
  vf = v.astype(jnp.float32)
  p = jnp.floor(vf * (1.0 - fs) + 0.5)
  q = jnp.floor(vf * (1.0 - fs * frac) + 0.5)
  t = jnp.floor(vf * (1.0 - fs * (1.0 - frac)) + 0.5)
  sector = i.astype(jnp.int32) % 6
  pick = lambda *c: jnp.select([sector == k for k in range(5)], list(c[:5]), c[5])  # noqa: E731
  out = jnp.stack([pick(vf, q, p, p, t, vf), pick(t, vf, vf, q, p, p), pick(p, p, t, vf, vf, q)],
                  -1)
  gray = (s == 0)[..., None]
  return jnp.where(gray, vf[..., None], jnp.clip(out, 0, 255))


@functools.cache
def _hsv_tables() -> tuple[np.ndarray, np.ndarray]:
  """Pillow's rgb2hsv hue and saturation bytes as tables: hue [511²] by (R − G, G − B) (the hue
  depends on the differences only), saturation [256²] by (max, max − min). Computed with the
  float32 / double steps of Convert.c, so the 8-bit truncations fall where Pillow's do."""
  d_rg, d_gb = np.meshgrid(np.arange(-255, 256), np.arange(-255, 256), indexing="ij")
  b = np.maximum(0, np.maximum(-d_gb, -d_gb - d_rg))
  g = b + d_gb
  r = g + d_rg
  maxc = np.maximum(r, np.maximum(g, b))
  cr = (maxc - np.minimum(r, np.minimum(g, b))).astype(np.float32)
  safe = np.where(cr > 0, cr, np.float32(1))
  rc, gc, bc = ((maxc - c).astype(np.float32) / safe for c in (r, g, b))
  h = np.where(r == maxc, (bc - gc).astype(np.float64),
               np.where(g == maxc, 2.0 + rc.astype(np.float64) - bc,
                        4.0 + gc.astype(np.float64) - rc))
  h = h.astype(np.float32)                                          # float h
  h = np.fmod(h.astype(np.float64) / 6.0 + 1.0, 1.0).astype(np.float32)
  hue = np.where(cr > 0, np.clip((h.astype(np.float64) * 255.0).astype(np.int64), 0, 255), 0)
  vmax, chroma = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
  s = chroma.astype(np.float32) / np.maximum(vmax, 1).astype(np.float32)
  sat = np.where((chroma > 0) & (chroma <= vmax),
                 np.clip((s.astype(np.float64) * 255.0).astype(np.int64), 0, 255), 0)
  return hue.astype(np.uint8).reshape(-1), sat.astype(np.uint8).reshape(-1)
