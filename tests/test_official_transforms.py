"""data.resize = "bilinear" and augment.erase_fill = "after_normalize": reid-strong-baseline's
transforms (T.Resize on a PIL image, RandomErasing(mean=PIXEL_MEAN) after T.Normalize)."""
import numpy as np
import pytest
from PIL import Image

import jax

from jaxreid.data.augment import apply, draw, eval_transform
from jaxreid.data.datasets import ReidSplit, relabel
from jaxreid.data.pipeline import eval_batches, train_batches

PIXEL_MEAN, PIXEL_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
OFF = dict(pad=0, flip=False, rotate_deg=0.0, color_jitter=False, occlusion=False)


def _image(seed, shape=(50, 23, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def torchvision_resize(image, height, width):
  """torchvision's T.Resize((h, w)) on a PIL image: PIL resize, bilinear by default."""
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _split():
  images = [_image(i) for i in range(4)]
  pids = np.array([1, 1, 2, 2])
  labels, num_classes = relabel(pids)
  return ReidSplit(source=[{"image": im, "pid": int(p)} for im, p in zip(images, pids)],
                   pids=pids, labels=labels, cams=np.zeros(4, np.int32),
                   times=np.full(4, np.nan, np.float32), filenames=[f"{i}.png" for i in range(4)],
                   num_classes=num_classes, name="fake:train")


def test_bilinear_resize_in_train_and_eval_batches():
  images = [_image(i) for i in range(4)]
  split = _split()
  want = np.stack([torchvision_resize(im, 32, 16) for im in images])
  (batch, _), = eval_batches(split, batch_size=4, height=32, width=16, resize="bilinear",
                             num_threads=0)
  np.testing.assert_array_equal(batch["image"], want)
  batch, = train_batches(split, np.arange(4)[None], epoch=0, seed=0, height=32, width=16,
                         augment=dict(OFF), resize="bilinear", num_threads=0)
  np.testing.assert_array_equal(batch["image"], want)
  assert np.abs(eval_transform(images[0], height=32, width=16).astype(int) - want[0]).max() > 5
  with pytest.raises(ValueError, match="data.resize"):
    eval_transform(images[0], height=32, width=16, resize="nearest")


def _erase(image, seed, **options):
  factors = draw(np.random.default_rng(seed), height=64, width=32, **OFF, random_erasing=1.0,
                 **options)
  return np.asarray(apply(image[None], jax.tree.map(lambda x: x[None], factors)))[0]


def test_erasing_fill_is_pixel_mean_after_normalisation():
  image = np.zeros((64, 32, 3), np.uint8)
  for seed in range(5):
    out = _erase(image, seed, erase_fill="after_normalize")
    erased = out.any(-1)
    assert erased.sum() > 0
    normalised = (out[erased] / 255.0 - PIXEL_MEAN) / PIXEL_STD   # T.ToTensor + T.Normalize
    # the official RandomErasing writes PIXEL_MEAN into the normalised tensor; uint8 rounding
    np.testing.assert_allclose(normalised, np.broadcast_to(PIXEL_MEAN, normalised.shape),
                               atol=0.5 / 255 / PIXEL_STD.min() + 1e-9)
  default = _erase(image, 0)
  assert tuple(default[default.any(-1)][0]) == (125, 123, 114)
  with pytest.raises(ValueError, match="erase_fill"):
    list(train_batches(_split(), np.arange(2)[None], epoch=0, seed=0, height=32, width=16,
                       augment=dict(OFF, erase_fill="zero")))
