"""The batched augmentation (host draws + `augment.apply`) against Pillow, which the official
torchvision transforms call: geometry bit-exact, colour within two levels on 99.9 % of pixels,
each transform for given factors and the whole pipeline of every paper setting for given seeds
(tests/pil_augment.py is the one-image-at-a-time Pillow reference)."""
import jax
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

import pil_augment
from jaxreid.data import augment
from jaxreid.data.augment import apply, draw, eval_transform, rotation_coefficients

apply_jit = jax.jit(apply)


def _photo(seed, height, width):
  """Smooth gradients with noise: colours of every hue, saturation and brightness."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width] / max(height, width)
  base = np.stack([np.sin(6 * x + rng.uniform(0, 6)), np.cos(5 * y + rng.uniform(0, 6)),
                   np.sin(4 * (x + y) + rng.uniform(0, 6))], -1) * 110 + 128
  return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _noise(seed, height, width):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def _stack(factors):
  return jax.tree.map(lambda *x: np.stack(x), *factors)


def _apply(images, factors):
  return np.asarray(apply_jit(np.stack(images), _stack(factors)))


def _off_by_more_than_two(ours, reference) -> float:
  """The share of pixels where some channel differs from `reference` by more than two levels."""
  return float((np.abs(ours.astype(int) - np.asarray(reference).astype(int)).max(-1) > 2).mean())


# ------------------------------------------------------------------------------ geometry

@pytest.mark.parametrize("shape", [(64, 32), (63, 31), (384, 128)])
def test_rotation_equals_pillow_bit_for_bit(shape):
  height, width = shape
  angles = [0.0, 1e-9, 0.4, -0.4, 4.999, -5.0, 2.5, 30.0, -61.7, 89.0, 360.0 - 3.0]
  images = [_noise(i, height, width) for i in range(len(angles))]
  want = [np.asarray(Image.fromarray(im).rotate(a, Image.Resampling.NEAREST, fillcolor=0))
          for im, a in zip(images, angles)]
  got = _apply(images, [{"affine": rotation_coefficients(a, height, width)} for a in angles])
  np.testing.assert_array_equal(got, np.stack(want))


def test_pad_crop_and_flip_equal_pillow_bit_for_bit():
  height, width, pad = 64, 32, 10
  rng = np.random.default_rng(0)
  images, factors, want = [], [], []
  for i in range(24):
    image = _noise(i, height, width)
    top, left = (int(v) for v in rng.integers(0, 2 * pad + 1, 2))
    flip = bool(i % 2)
    reference = ImageOps.expand(Image.fromarray(image), border=pad, fill=0).crop(
        (left, top, left + width, top + height))
    if flip:
      reference = reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    images.append(image)
    factors.append({"shift": np.array([top - pad, left - pad], np.int32), "flip": np.bool_(flip)})
    want.append(np.asarray(reference))
  np.testing.assert_array_equal(_apply(images, factors), np.stack(want))


def test_crop_flip_rotate_compose_as_pillow_applies_them():
  height, width, pad = 96, 48, 10
  images, factors, want = [], [], []
  for i in range(16):
    rng = np.random.default_rng(i)
    image = _noise(i, height, width)
    top, left = (int(v) for v in rng.integers(0, 2 * pad + 1, 2))
    angle = rng.uniform(-5, 5)
    reference = ImageOps.expand(Image.fromarray(image), border=pad, fill=0).crop(
        (left, top, left + width, top + height)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    reference = reference.rotate(angle, Image.Resampling.NEAREST, fillcolor=0)
    images.append(image)
    factors.append({"shift": np.array([top - pad, left - pad], np.int32), "flip": np.bool_(True),
                    "affine": rotation_coefficients(angle, height, width)})
    want.append(np.asarray(reference))
  np.testing.assert_array_equal(_apply(images, factors), np.stack(want))


# -------------------------------------------------------------------------------- colour

def test_hsv_tables_equal_pillow_for_every_colour():
  """Pillow's RGB → HSV hue and saturation bytes for all 2^24 colours."""
  r, g, b = np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing="ij")
  rgb = np.stack([r, g, b], -1).reshape(4096, 4096, 3).astype(np.uint8)
  hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).reshape(-1, 3).astype(np.int64)
  r, g, b = (c.reshape(-1).astype(np.int64) for c in (r, g, b))
  hue, sat = augment._hsv_tables()
  v = np.maximum(r, np.maximum(g, b))
  np.testing.assert_array_equal(hue[(r - g + 255) * 511 + (g - b + 255)], hsv[:, 0])
  np.testing.assert_array_equal(sat[v * 256 + v - np.minimum(r, np.minimum(g, b))], hsv[:, 1])


def _one_op(op, value):
  """Jitter factors that apply only `op` (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
  factors = np.ones(3, np.float32)
  if op < 3:
    factors[op] = value
  order = np.array([op] + [o for o in range(4) if o != op], np.int32)
  # the other blends have factor 1 (an identity); the hue step, shift 0 unless it is `op`, is
  # a lossy HSV round trip in Pillow too, and comes after `op`
  return {"jitter_order": order, "jitter": factors, "hue": np.int32(value if op == 3 else 0)}


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_each_colour_op_equals_pillow(op):
  index = ["brightness", "contrast", "saturation", "hue"].index(op)
  values = [-25, -13, -1, 0, 1, 7, 25, 12] if op == "hue" else [0.5, 0.61, 0.99, 1.0, 1.37,
                                                                1.5, 1.93, 2.0]
  images = [(_photo if i % 2 else _noise)(i, 64, 32) for i in range(len(values))]
  want = []
  for image, value in zip(images, values):
    pil = Image.fromarray(image)
    if op == "hue":   # Pillow's HSV round trip is lossy: the reference makes it too
      pil = pil_augment._adjust_hue(pil, value / 255)
    else:
      enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                  "saturation": ImageEnhance.Color}[op]
      pil = pil_augment._adjust_hue(enhancer(pil).enhance(value), 0.0)
    want.append(np.asarray(pil))
  assert _off_by_more_than_two(_apply(images, [_one_op(index, v) for v in values]),
                               np.stack(want)) <= 1e-3


def test_hsv_round_trip_for_every_colour():
  """Pillow's HSV → RGB of the hue-shifted HSV bytes, for all 2^24 colours and one shift."""
  rgb = np.stack(np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing="ij"),
                 -1).reshape(256, 65536, 3).astype(np.uint8)
  want = np.asarray(pil_augment._adjust_hue(Image.fromarray(rgb), 9 / 255))
  got = np.asarray(jax.jit(augment._shift_hue)(rgb.astype(np.float32), 9))
  diff = np.abs(got - want.astype(np.float32)).max(-1)
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_jitter_in_random_order_equals_pillow():
  images, factors, want = [], [], []
  for i in range(24):
    rng = np.random.default_rng(100 + i)
    image = (_photo if i % 3 else _noise)(i, 64, 32)
    images.append(image)
    want.append(np.asarray(pil_augment.jitter_colors(Image.fromarray(image), rng)))
    factors.append(draw(np.random.default_rng(100 + i), height=64, width=32, pad=0, flip=False,
                        rotate_deg=0.0, color_jitter=True, occlusion=False))
  assert _off_by_more_than_two(_apply(images, factors), np.stack(want)) <= 1e-3


# ------------------------------------------------------------------- every paper setting

def _settings():
  from configs import embedding, kpm, nformer, pat, qaconv, qaconv_gs, transmatcher
  return {"qaconv_gs:market": qaconv_gs.get_config("market"),
          "transmatcher:market": transmatcher.get_config("market"),
          "qaconv:market": qaconv.get_config("market"),
          "embedding:market": embedding.get_config("market"),
          "nformer:market": nformer.get_config("market"),
          "kpm:market": kpm.get_config("market"),
          "pat:market": pat.get_config("market"),
          "synthetic default": qaconv_gs.get_config()}


@pytest.mark.parametrize("name", list(_settings()))
def test_whole_augmentation_of_each_setting_equals_pillow(name):
  """Same seeds: the Pillow reference and draw + apply make the same images (bit-exact without
  colour jitter), so the factors are drawn as the official transforms draw them."""
  config = _settings()[name]
  d = config.data
  height, width = d.height // 2, d.width // 2    # the transforms' arithmetic, at less cost
  options = d.augment.to_dict()
  images, factors, want = [], [], []
  for i in range(8):
    source = _photo(i, 128, 64)
    resized = eval_transform(source, height=height, width=width, resize=d.get("resize", "bicubic"))
    want.append(pil_augment.train_transform(source, np.random.default_rng([7, i]), height=height,
                                            width=width, resize=d.get("resize", "bicubic"),
                                            **options))
    images.append(resized)
    factors.append(draw(np.random.default_rng([7, i]), height=height, width=width, **options))
  got = _apply(images, factors)
  if options.get("color_jitter"):
    assert _off_by_more_than_two(got, np.stack(want)) <= 1e-3
  else:
    np.testing.assert_array_equal(got, np.stack(want))


def test_factor_distributions_are_the_official_ones():
  n, height, width = 4000, 384, 128
  draws = [draw(np.random.default_rng([1, i]), height=height, width=width, pad=10, flip=True,
                rotate_deg=5.0, color_jitter=True, occlusion=True, random_erasing=0.5)
           for i in range(n)]
  f = _stack(draws)
  shift = f["shift"] + 10                       # Pad(10) + RandomCrop: offsets uniform in 0..20
  assert shift.min() == 0 and shift.max() == 20 and abs(shift.mean() - 10) < 0.3
  assert abs(f["flip"].mean() - 0.5) < 0.03
  cos = f["affine"][:, 0] / 65536               # RandomRotation(5): cos of a uniform angle
  angle = np.degrees(np.arccos(np.clip(cos, -1, 1))) * np.sign(f["affine"][:, 1])
  assert np.abs(angle).max() <= 5.0 and np.abs(angle).max() > 4.9 and abs(angle.mean()) < 0.15
  jitter = f["jitter"]                          # ColorJitter(0.5, 0.5, 0.5, 0.1)
  assert jitter.min() >= 0.5 and jitter.max() <= 2.0 and abs(jitter.mean() - 1.25) < 0.02
  assert f["hue"].min() == -26 or f["hue"].min() == -25
  assert f["hue"].max() in (25, 26) and abs(f["hue"].mean()) < 0.6
  first = np.bincount(f["jitter_order"][:, 0], minlength=4) / n
  assert np.abs(first - 0.25).max() < 0.03 and (np.sort(f["jitter_order"], 1) == np.arange(4)).all()
  side = f["boxes"][:, 0, 2]                    # occlusion: side uniform in 1..0.8·width
  assert side.min() == 1 and side.max() == int(0.8 * width)
  erased = f["boxes"][:, 1, 2] > 0              # RandomErasing(p = 0.5), area 2–40 %
  assert abs(erased.mean() - 0.5) < 0.03
  area = (f["boxes"][erased, 1, 2] * f["boxes"][erased, 1, 3]) / (height * width)
  assert area.min() >= 0.019 and area.max() <= 0.41


def test_evaluation_resize_is_pillow_bicubic():
  image = _photo(0, 128, 64)
  want = np.asarray(Image.fromarray(image).resize((128, 384), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(eval_transform(image, height=384, width=128), want)


def test_bad_options_are_one_sentence():
  with pytest.raises(ValueError, match="data.augment has unknown fields"):
    augment.check_options({"pad": 4, "colour_jitter": True})
  with pytest.raises(ValueError, match="erase_fill"):
    augment.check_options({"erase_fill": "zero"})
  with pytest.raises(ValueError, match="rotate_deg"):
    augment.check_options({"rotate_deg": 120.0})
