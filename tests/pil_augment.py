"""The reference for jaxreid.data.augment: the training augmentation as Pillow operations on one
image at a time (the torchvision transforms of the official code call the same Pillow functions),
drawing its factors from `rng` in the official order. jaxreid's host draws + batched `apply` must
give these images."""
import numpy as np
from PIL import Image, ImageEnhance, ImageOps


RESIZE = {"bicubic": Image.Resampling.BICUBIC,   # QAConv / TransMatcher
          "bilinear": Image.Resampling.BILINEAR}  # torchvision T.Resize's default (reid-strong-baseline)


def _resize(img: Image.Image, height: int, width: int, resize: str = "bicubic") -> Image.Image:
  if resize not in RESIZE:
    raise ValueError(f"data.resize={resize!r} is unknown; use one of {sorted(RESIZE)}.")
  if img.size == (width, height):
    return img
  return img.resize((width, height), RESIZE[resize])


def _adjust_hue(img: Image.Image, shift: float) -> Image.Image:
  """Rotates the hue by `shift` turns (as torchvision: on Pillow's 8-bit HSV hue channel)."""
  h, s, v = img.convert("HSV").split()
  hue = (np.asarray(h, np.int16) + int(round(shift * 255))) % 256
  return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB")


def jitter_colors(img: Image.Image, rng: np.random.Generator, *, low: float = 0.5,
                 high: float = 2.0, hue: float = 0.1) -> Image.Image:
  """Brightness, contrast and saturation factors uniform in [low, high] and a hue shift uniform
  in [-hue, hue], applied in a random order (torchvision's ColorJitter)."""
  for op in rng.permutation(4):
    if op == 0:
      img = ImageEnhance.Brightness(img).enhance(rng.uniform(low, high))
    elif op == 1:
      img = ImageEnhance.Contrast(img).enhance(rng.uniform(low, high))
    elif op == 2:
      img = ImageEnhance.Color(img).enhance(rng.uniform(low, high))
    else:
      img = _adjust_hue(img, rng.uniform(-hue, hue))
  return img


def occlude(image: np.ndarray, rng: np.random.Generator, max_fraction: float = 0.8) -> np.ndarray:
  """A white square, side uniform in [1, max_fraction * width], at a uniform position."""
  height, width = image.shape[:2]
  side = int(rng.integers(1, max(1, min(int(max_fraction * width), height)) + 1))
  y = int(rng.integers(0, height - side + 1))
  x = int(rng.integers(0, width - side + 1))
  image = image.copy()
  image[y:y + side, x:x + side] = 255
  return image


ERASE_FILL = (125, 123, 114)  # RandomErasing's default mean (0.4914, 0.4822, 0.4465) × 255
# reid-strong-baseline passes PIXEL_MEAN (0.485, 0.456, 0.406) and erases *after* Normalize, so the
# erased pixels hold PIXEL_MEAN in normalised units: pixel = (mean + PIXEL_MEAN · std) · 255,
# rounded to uint8 here (docs/methods/embedding.md).
_MEAN, _STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
ERASE_FILLS = {"pixels": ERASE_FILL,
               "after_normalize": tuple(int(v) for v in np.round((_MEAN + _MEAN * _STD) * 255))}


def random_erase(image: np.ndarray, rng: np.random.Generator, *, area=(0.02, 0.4),
                 aspect=0.3, attempts: int = 100, fill=ERASE_FILL) -> np.ndarray:
  """Random erasing (Zhong et al. 2020): a rectangle of area fraction uniform in `area` and
  aspect ratio uniform in [aspect, 1/aspect], filled with `fill` (RGB pixels); after `attempts`
  draws that do not fit, the image unchanged."""
  height, width = image.shape[:2]
  for _ in range(attempts):
    target = rng.uniform(*area) * height * width
    ratio = rng.uniform(aspect, 1 / aspect)
    h, w = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
    if 0 < h < height and 0 < w < width:
      y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      image = image.copy()
      image[y:y + h, x:x + w] = fill
      return image
  return image


def train_transform(image: np.ndarray, rng: np.random.Generator, *, height: int, width: int,
                    pad: int = 10, flip: bool = True, rotate_deg: float = 5.0,
                    color_jitter: bool = True, occlusion: bool = True,
                    random_erasing: float = 0.0, erase_fill: str = "pixels",
                    resize: str = "bicubic") -> np.ndarray:
  """Training augmentation: resize (`resize`: bicubic or bilinear), zero-pad + random crop,
  horizontal flip (p=0.5), rotation uniform in ±rotate_deg (nearest, zero fill), colour jitter,
  occlusion (QAConv), random erasing with probability `random_erasing` (reid-strong-baseline),
  filled with ERASE_FILLS[erase_fill]."""
  if erase_fill not in ERASE_FILLS:
    raise ValueError(f"data.augment.erase_fill={erase_fill!r} is unknown; use one of "
                     f"{sorted(ERASE_FILLS)}.")
  img = _resize(Image.fromarray(image), height, width, resize)
  if pad > 0:
    img = ImageOps.expand(img, border=pad, fill=0)
    top, left = (int(v) for v in rng.integers(0, 2 * pad + 1, 2))
    img = img.crop((left, top, left + width, top + height))
  if flip and rng.random() < 0.5:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if rotate_deg > 0:
    img = img.rotate(rng.uniform(-rotate_deg, rotate_deg), Image.Resampling.NEAREST, fillcolor=0)
  if color_jitter:
    img = jitter_colors(img, rng)
  out = np.asarray(img, np.uint8)
  if occlusion:
    out = occlude(out, rng)
  if random_erasing and rng.random() < random_erasing:
    out = random_erase(out, rng, fill=ERASE_FILLS[erase_fill])
  return out
