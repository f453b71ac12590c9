"""Augmentations and the grain batch pipeline on an in-memory split."""
import numpy as np
import pytest

import jax

from jaxreid.data.augment import apply, draw, eval_transform
from jaxreid.data.datasets import ReidSplit, relabel
from jaxreid.data.pipeline import eval_batches, train_batches

H, W = 48, 24
OFF = dict(pad=0, flip=False, rotate_deg=0.0, color_jitter=False, occlusion=False)
DEFAULTS = dict(pad=4, flip=True, rotate_deg=5.0, color_jitter=True, occlusion=True,
                random_erasing=0.5)


def _image(seed=0, shape=(40, 20, 3)):
  """A smooth, left-right asymmetric colour image."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:shape[0], :shape[1]]
  base = np.stack([x * 200 / shape[1], y * 200 / shape[0], 50 + 0 * x], -1) + rng.uniform(0, 50, 3)
  return base.astype(np.uint8)


def _split(n=10, images=None):
  images = images or [_image(i) for i in range(n)]
  pids = np.arange(len(images), dtype=np.int32) // 2 + 5
  source = [{"image": im, "pid": int(p)} for im, p in zip(images, pids)]
  labels, num_classes = relabel(pids)
  return ReidSplit(source=source, pids=pids, labels=labels, cams=np.zeros(len(images), np.int32),
                   times=np.full(len(images), np.nan, np.float32),
                   filenames=[f"img{i}.png" for i in range(len(images))],
                   num_classes=num_classes, name="fake:train")


def _augment(image, seed, **options):
  """`image` (already H×W) through one slot's draw + apply."""
  factors = draw(np.random.default_rng(seed), height=H, width=W, **{**OFF, **options})
  return np.asarray(apply(image[None], jax.tree.map(lambda x: np.asarray(x)[None], factors)))[0]


def test_shapes_and_identity_without_augmentation():
  image = _image()
  resized = eval_transform(image, height=H, width=W)
  assert resized.shape == (H, W, 3) and resized.dtype == np.uint8
  assert draw(np.random.default_rng(0), height=H, width=W, **OFF) == {}
  np.testing.assert_array_equal(_augment(resized, 0), resized)
  out = _augment(resized, 0, **DEFAULTS)
  assert out.shape == (H, W, 3) and out.dtype == np.uint8
  assert eval_transform(resized, height=H, width=W) is resized


@pytest.mark.parametrize("flag", ["flip", "rotate_deg", "color_jitter", "occlusion", "pad",
                                  "random_erasing"])
def test_each_augmentation_changes_images(flag):
  image = eval_transform(_image(), height=H, width=W)
  value = {"rotate_deg": 10.0, "pad": 6, "random_erasing": 0.5}.get(flag, True)
  changed = [not np.array_equal(image, _augment(image, s, **{flag: value})) for s in range(16)]
  assert sum(changed) >= (4 if flag in ("flip", "random_erasing") else 13)


def test_flip_mirrors():
  image = eval_transform(_image(), height=H, width=W)
  outs = [_augment(image, s, flip=True) for s in range(8)]
  assert all(np.array_equal(o, image) or np.array_equal(o, image[:, ::-1]) for o in outs)
  assert any(not np.array_equal(o, image) for o in outs)


def test_occlusion_is_a_white_square():
  image = np.zeros((H, W, 3), np.uint8)
  sides = []
  for s in range(50):
    out = _augment(image, s, occlusion=True)
    ys, xs = np.nonzero(out.all(-1))
    assert (out[ys, xs] == 255).all() and (out.sum(-1) > 0).sum() == len(ys)
    side = ys.max() - ys.min() + 1
    assert side == xs.max() - xs.min() + 1 and len(ys) == side * side
    sides.append(side)
  assert 1 <= min(sides) and max(sides) <= int(0.8 * W) and max(sides) > W // 2


def _images(batches):
  return [np.asarray(apply(b["image"], b["augment"])) for b in batches]


def test_train_batches_deterministic_and_resumable():
  split = _split()
  plan = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]])
  kwargs = dict(epoch=2, seed=1, height=H, width=W, augment=DEFAULTS, num_threads=2)
  full = list(train_batches(split, plan, **kwargs))
  assert len(full) == 3
  for batch, row in zip(full, plan):
    assert batch["image"].shape == (4, H, W, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == batch["index"].dtype == np.int32
    assert batch["augment"]["affine"].shape == (4, 6) and batch["augment"]["boxes"].shape == (4, 2, 4)
    np.testing.assert_array_equal(batch["index"], row)
    np.testing.assert_array_equal(batch["label"], split.labels[row])
  images = _images(full)
  again = _images(train_batches(split, plan, **{**kwargs, "num_threads": 0}))
  tail = _images(train_batches(split, plan, start_batch=1, **kwargs))
  for a, b in zip(images, again):
    np.testing.assert_array_equal(a, b)
  assert len(tail) == 2
  for a, b in zip(images[1:], tail):
    np.testing.assert_array_equal(a, b)
  other = _images([next(train_batches(split, plan, **{**kwargs, "epoch": 3}))])[0]
  assert not np.array_equal(other, images[0])
  # Slot 0 of batch 2 and slot 0 of batch 0 show image 0 with different augmentations.
  assert not np.array_equal(images[2][2], images[0][0])
  # Two processes loading halves of every batch see exactly the single-process images.
  halves = [list(train_batches(split, plan, slots=s, **kwargs))
            for s in (slice(0, 2), slice(2, 4))]
  for b, batch in enumerate(full):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][b][key], halves[1][b][key]]), batch[key])
    np.testing.assert_array_equal(
        np.concatenate([_images([halves[0][b]])[0], _images([halves[1][b]])[0]]), images[b])


def test_worker_processes_give_the_same_batches():
  split = _split()
  plan = np.arange(20).reshape(5, 4) % 10
  kwargs = dict(epoch=0, seed=3, height=H, width=W, augment=DEFAULTS, num_threads=1)
  inline = list(train_batches(split, plan, **kwargs))
  workers = list(train_batches(split, plan, num_workers=2, **kwargs))
  assert len(workers) == len(inline) == 5
  for a, b in zip(inline, workers):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  (evaluated, n), = eval_batches(split, batch_size=16, height=H, width=W, num_workers=2)
  assert n == 10
  np.testing.assert_array_equal(evaluated["image"][3], eval_transform(_image(3), height=H, width=W))


def test_train_batches_without_augmentation_are_resized_images():
  split = _split()
  batch = next(train_batches(split, np.array([[3, 1]]), epoch=0, seed=0, height=H, width=W,
                             augment=None))
  np.testing.assert_array_equal(batch["image"][0], eval_transform(_image(3), height=H, width=W))


def test_eval_batches_pad_the_last_batch():
  split = _split(n=7)
  batches = list(eval_batches(split, batch_size=3, height=H, width=W))
  assert [n for _, n in batches] == [3, 3, 1]
  assert all(b["image"].shape == (3, H, W, 3) for b, _ in batches)
  assert not batches[-1][0]["image"][1:].any()
  np.testing.assert_array_equal(batches[1][0]["image"][0],
                                eval_transform(_image(3), height=H, width=W))
  picked = list(eval_batches(split, batch_size=4, height=H, width=W, indices=np.array([6, 2])))
  assert len(picked) == 1 and picked[0][1] == 2
  np.testing.assert_array_equal(picked[0][0]["image"][0], eval_transform(_image(6), height=H, width=W))


class _Broken:
  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    if self.images[i] is None:
      raise OSError("truncated PNG")
    return {"image": self.images[i]}


@pytest.mark.parametrize("bad", [None, np.zeros((40, 20, 1), np.uint8)])
def test_bad_image_names_split_index_and_file(bad):
  split = _split(n=4)
  split.source = _Broken([_image(0), _image(1), bad, _image(3)])
  with pytest.raises(ValueError, match=r"image 2 \(img2.png\) of fake:train"):
    list(eval_batches(split, batch_size=2, height=H, width=W))
  with pytest.raises(ValueError, match="img2.png"):
    list(train_batches(split, np.array([[0, 2]]), epoch=0, seed=0, height=H, width=W, augment={}))
