"""Input pipeline throughput: what one host core prepares per second for every paper setting's
training augmentation, before (Pillow, one image at a time, as the official torchvision
transforms) and now (host: decode + resize + factor draws; the transforms in the jitted step),
how the host part scales with grain threads and worker processes, and what the augmentation
moved into the step costs next to the step itself.

The images come from a Market-1501 stand-in (128×64 JPEGs laid out as the real archive) built
with the market1501 TFDS builder, read through the same ArrayRecord source and TFDS decoding as
training. Per-core rates are process CPU time of one thread (`time.process_time`); scaling is
wall time. Prints one JSON line per measurement and a summary table.

  python bench/bench_input_pipeline.py                       # every setting, ~15 min on 2 cores
  python bench/bench_input_pipeline.py --quick               # small, for a smoke run
  python bench/bench_input_pipeline.py --no-step             # skip the training-step timing
"""
import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(REPO / "tests")):
  if path not in sys.path:
    sys.path.insert(0, path)

SETTINGS = ("qaconv_gs:market", "transmatcher:market", "qaconv:market", "embedding:market",
            "nformer:market", "kpm:market", "pat:market")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="few images, small step models")
  p.add_argument("--settings", default=",".join(SETTINGS))
  p.add_argument("--ids", type=int, default=120, help="identities of the stand-in archive")
  p.add_argument("--data-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                    "jaxreid_bench_pipeline"))
  p.add_argument("--no-step", action="store_true", help="skip the training-step timing")
  p.add_argument("--step-batch", type=int, default=8, help="images per timed training step")
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  return p.parse_args(argv)


class Recorder:
  def __init__(self, path):
    self.path = path

  def __call__(self, **record):
    line = json.dumps(record)
    print(line, flush=True)
    if self.path:
      with open(self.path, "a") as f:
        f.write(line + "\n")


def photo_like(rng, height=128, width=64) -> np.ndarray:
  """A person-crop-like image: smooth coloured regions, edges and sensor noise (JPEG sizes like
  Market's, 3–6 KB)."""
  y, x = np.mgrid[:height, :width] / height
  image = np.empty((height, width, 3))
  for c in range(3):
    image[..., c] = 128 + 90 * np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6)) * np.cos(
        rng.uniform(2, 9) * y + rng.uniform(0, 6))
  image[height // 5: 3 * height // 5, width // 4: 3 * width // 4] = rng.integers(0, 256, 3)
  image[3 * height // 5:, width // 3: 2 * width // 3] = rng.integers(0, 256, 3)
  return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def build_market(data_dir: str, num_ids: int):
  """A Market-1501 stand-in of 128×64 JPEGs built with the market1501 builder (once)."""
  from PIL import Image
  import reid_dummy
  from jaxreid.data import datasets
  manual = pathlib.Path(data_dir) / f"manual_{num_ids}"
  tfds_dir = str(pathlib.Path(data_dir) / f"tfds_{num_ids}")
  root = manual / "Market-1501-v15.09.15"
  if not root.exists():
    rng = np.random.default_rng(0)
    ids = range(1, num_ids + 1)
    folders = {"bounding_box_train": reid_dummy.market_rows(ids, (1, 2, 3), (1, 2), 100, 2),
               "query": reid_dummy.market_rows(ids[:3], (1, 2), (1,), 400),
               "bounding_box_test": reid_dummy.market_rows(ids[:3], (3,), (1,), 700)}
    for folder, rows in folders.items():
      (root / folder).mkdir(parents=True, exist_ok=True)
      for name, _, _ in rows:
        Image.fromarray(photo_like(rng)).save(root / folder / name, quality=95)
  return datasets.load_split("market1501", "train", data_dir=tfds_dir, manual_dir=str(manual))


def per_core(fn, n: int) -> float:
  """Calls per second of process CPU time (one thread)."""
  fn(0)
  t0 = time.process_time()
  for i in range(n):
    fn(i)
  return n / (time.process_time() - t0)


def setting_config(name: str):
  import importlib
  method, _, variant = name.partition(":")
  return importlib.import_module(f"configs.{method}").get_config(variant or None)


def host_rates(split, config, n: int, record) -> dict:
  """Per-core rates of each host stage, of the whole host pipeline, and of the Pillow path."""
  import pil_augment
  from PIL import Image, ImageOps
  from jaxreid.data import augment, pipeline
  d = config.data
  height, width, options = d.height, d.width, d.augment.to_dict()
  method = d.get("resize", "bicubic")
  count = len(split)
  decoded = [pipeline.load_image(split, i) for i in range(min(count, 64))]
  resized = [augment.eval_transform(im, height=height, width=width, resize=method)
             for im in decoded]
  rates = {
      "decode": per_core(lambda i: pipeline.load_image(split, i % count), n),
      "resize": per_core(lambda i: augment.eval_transform(decoded[i % 64], height=height,
                                                          width=width, resize=method), n),
      "draw": per_core(lambda i: augment.draw(np.random.default_rng([0, 0, 0, i]),
                                              height=height, width=width, **options), n)}
  plan = np.arange(n - n % 32).reshape(-1, 32) % count
  t0 = time.process_time()
  seen = sum(len(b["label"]) for b in pipeline.train_batches(
      split, plan, epoch=0, seed=0, height=height, width=width, augment=options, num_threads=0,
      resize=method))
  rates["host_pipeline"] = seen / (time.process_time() - t0)

  # Before: each transform in Pillow on one image, then the whole per-image Pillow path.
  pad = options.get("pad", 0)
  pil = {}
  if pad:
    pil["pad_crop"] = lambda im: ImageOps.expand(Image.fromarray(im), border=pad, fill=0).crop(
        (3, 5, 3 + width, 5 + height))
  if options.get("flip"):
    pil["flip"] = lambda im: Image.fromarray(im).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if options.get("rotate_deg"):
    pil["rotate"] = lambda im: Image.fromarray(im).rotate(3.3, Image.Resampling.NEAREST,
                                                           fillcolor=0)
  if options.get("color_jitter"):
    pil["color_jitter"] = lambda im: pil_augment.jitter_colors(Image.fromarray(im),
                                                               np.random.default_rng(0))
  if options.get("occlusion"):
    pil["occlusion"] = lambda im: pil_augment.occlude(im, np.random.default_rng(0))
  if options.get("random_erasing"):
    pil["random_erasing"] = lambda im: pil_augment.random_erase(im, np.random.default_rng(0))
  for name, fn in pil.items():
    rates[f"pillow_{name}"] = per_core(lambda i: np.asarray(fn(resized[i % 64])), n)
  rates["pillow_pipeline"] = per_core(lambda i: pil_augment.train_transform(
      pipeline.load_image(split, i % count), np.random.default_rng(i), height=height,
      width=width, resize=method, **options), n)
  for stage, rate in rates.items():
    record(kind="per_core", setting=config.get("_name"), stage=stage,
           images_per_s=round(rate, 1), input=[height, width])
  return rates


def scaling(split, config, n: int, record) -> None:
  """Wall-clock images/s of the host pipeline over 1 … all cores, threads and workers."""
  from jaxreid.data import pipeline
  d = config.data
  plan = np.arange(n - n % 32).reshape(-1, 32) % len(split)
  cores = os.cpu_count() or 1
  counts = sorted({1, 2, 4, 8, 16, cores} & set(range(1, cores + 1)))
  for mode in ("threads", "workers"):
    for k in counts:
      kwargs = (dict(num_threads=k, num_workers=0) if mode == "threads"
                else dict(num_threads=1, num_workers=k))
      t0 = time.perf_counter()
      batches = pipeline.train_batches(split, plan, epoch=0, seed=0, height=d.height,
                                       width=d.width, augment=d.augment.to_dict(),
                                       resize=d.get("resize", "bicubic"), **kwargs)
      first = next(batches)
      t1 = time.perf_counter()
      seen = len(first["label"]) + sum(len(b["label"]) for b in batches)
      t2 = time.perf_counter()
      record(kind="scaling", setting=config.get("_name"), mode=mode, count=k,
             images_per_s=round((seen - len(first["label"])) / (t2 - t1), 1),
             first_batch_s=round(t1 - t0, 2), cores=cores)


def device_costs(config, record, batch: int = 64) -> float:
  """Seconds per image of `augment.apply` (each transform, then all) jitted on this backend."""
  import jax
  from jaxreid.data import augment
  d = config.data
  options = d.augment.to_dict()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, d.height, d.width, 3), dtype=np.uint8)
  factors = jax.tree.map(lambda *x: np.stack(x), *[
      augment.draw(np.random.default_rng(i), height=d.height, width=d.width, **options)
      for i in range(batch)])
  groups = {"geometry": ("shift", "flip", "affine"),
            "color_jitter": ("jitter_order", "jitter", "hue"), "boxes": ("boxes", "box_fills")}
  costs = {}
  for name, keys in list(groups.items()) + [("all", tuple(factors))]:
    part = {k: v for k, v in factors.items() if k in keys}
    if not part:
      continue
    fn = jax.jit(augment.apply)
    fn(images, part).block_until_ready()
    reps = 5
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
      fn(images, part).block_until_ready()
    wall = (time.perf_counter() - t0) / reps / batch
    cpu = (time.process_time() - c0) / reps / batch
    costs[name] = wall
    record(kind="in_step", setting=config.get("_name"), transform=name,
           us_per_image_wall=round(wall * 1e6, 1), us_per_image_cpu=round(cpu * 1e6, 1),
           backend=jax.default_backend())
  return costs.get("all", 0.0)


def step_cost(config, batch: int, record) -> float:
  """Seconds per image of the setting's training step (random weights), augmentation included."""
  import jax
  from jaxreid import parallel, registry
  from jaxreid.data import augment
  from jaxreid.train.loop import create_train_state, make_train_step
  from jaxreid.train.optim import make_optimizer
  c = config
  c.model.pretrained = ""
  k = c.data.num_instances
  batch = max(k * 2, batch - batch % k)
  c.data.batch_size = batch
  if "num_classes" in c.model:
    c.model.num_classes = batch // k
  method = registry.method_of(c)
  model = method.build(c)
  objective = method.objectives[c.train.loss]
  tx = make_optimizer(c.train, steps_per_epoch=100)
  mesh = parallel.make_mesh()
  state = parallel.replicate(create_train_state(c, model, tx, objective, batch // k, batch,
                                                jax.random.key(0)), mesh)
  step = parallel.jit_train_step(make_train_step(model, tx, objective, c.train), mesh)
  rng = np.random.default_rng(0)
  options = c.data.augment.to_dict()
  host = {"image": rng.integers(0, 256, (batch, c.data.height, c.data.width, 3), dtype=np.uint8),
          "label": np.repeat(np.arange(batch // k, dtype=np.int32), k),
          "index": np.arange(batch, dtype=np.int32),
          "augment": jax.tree.map(lambda *x: np.stack(x), *[
              augment.draw(np.random.default_rng(i), height=c.data.height, width=c.data.width,
                           **options) for i in range(batch)])}
  data = parallel.shard_batch(host, mesh)
  t0 = time.perf_counter()
  state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  reps = 2
  t0 = time.perf_counter()
  for _ in range(reps):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  per_image = (time.perf_counter() - t0) / reps / batch
  record(kind="step", setting=c.get("_name"), batch=batch, input=[c.data.height, c.data.width],
         s_per_image=round(per_image, 4), images_per_s=round(1 / per_image, 2),
         first_step_s=round(compile_s, 1), backend=jax.default_backend())
  return per_image


def machine() -> dict:
  import jax
  import PIL
  from harness import cpu_name, git_state
  return dict(cpu=cpu_name(), cores=os.cpu_count(), jax=jax.__version__, pillow=PIL.__version__,
              backend=jax.default_backend(), commit=git_state()["commit"] or None,
              date=time.strftime("%Y-%m-%d"))


def main(argv=None):
  args = parse_args(argv)
  record = Recorder(args.out)
  record(kind="machine", **machine())
  n = 64 if args.quick else 512
  split = build_market(args.data_dir, 12 if args.quick else args.ids)
  summary = []
  for name in args.settings.split(","):
    config = setting_config(name)
    with config.unlocked():
      config._name = name
    if args.quick:
      config.data.height, config.data.width = config.data.height // 4, config.data.width // 4
    rates = host_rates(split, config, n, record)
    aug_cost = device_costs(config, record)
    step = None
    if not args.no_step:
      step_config = setting_config(name)
      with step_config.unlocked():
        step_config._name = name
      if args.quick:
        step_config.data.update(height=64, width=32)
        if "depth" in step_config.model:
          step_config.model.update(depth=18, width=8)
      step = step_cost(step_config, args.step_batch, record)
    summary.append(dict(setting=name, before=round(rates["pillow_pipeline"]),
                        after=round(rates["host_pipeline"]), decode=round(rates["decode"]),
                        in_step_us=round(aug_cost * 1e6, 1),
                        step_fraction=None if step is None else round(aug_cost / step, 5)))
  first = setting_config(args.settings.split(",")[0])
  with first.unlocked():
    first._name = args.settings.split(",")[0]
  scaling(split, first, n * 2, record)
  for row in summary:
    record(kind="summary", **row)


if __name__ == "__main__":
  main()
