"""The accelerator suite (docs/evaluation.md): one process measures jaxreid against the official
evaluators' logic on the same device and appends one JSON line per measurement to `--out`.

Sections (`--only` picks some):
  qaconv        QAConv scoring, 24×8 maps, d = 128: jaxreid float32 / bfloat16 (streaming
                ChunkScorer, probes resident) vs the QAConv v2.1 evaluator's logic in PyTorch
                (the matcher on 128 × 128 tiles, fp16 on a GPU) and, with --official, the
                official QAConv module driven the same way; pairs/s, fraction of bf16 peak.
  transmatcher  TransMatcher scoring (d 512, D 2048, N 3): jaxreid float32 / bfloat16 vs the
                PyTorch decoder of bench_transmatcher_scoring.py (float32, and fp16 autocast on
                a GPU) and, with --official, the official TransMatcher module driven as its
                evaluator drives it (make_kernel on 256 probes, gallery batches of 256).
  train         training-step throughput of the QAConv-GS paper setting (ResNet-50-IBN-b,
                384×128, batch 64, bfloat16, its augmentation inside the step), random weights,
                on one resident batch and fed by the real input pipeline (a Market-1501
                stand-in through TFDS, grain threads / workers: input-bound or not), vs the
                official v2.1 step transcribed in PyTorch (bench/torch_qaconv_gs_step.py; fp16
                AMP on a GPU).
  msmt_eval     the full MSMT17-size QAConv evaluation (11,659 × 82,161) with random weights on
                random images: query extraction, scoring alone (every gallery chunk's tiles
                against all probes), the streamed evaluation (gallery encoding + scoring
                overlapped) and the metrics, timed separately.
  memory        streamed evaluation at Market and MSMT17 size for QAConv-GS, TransMatcher and KPM
                (paper settings, random weights and images): every query extracted, then gallery
                chunks encoded and scored for --memory-seconds; host RSS, device memory in use
                and peak, the sizes of probes / chunk / score matrix, the projected scoring time.
  nformer       NFormer refinement of N = 93,820 features.
  kpm           KPM scoring at paper size.
  pat           PAT encoding (ViT-B/16, 256×128).

`--tiny` shrinks every model and size so the whole suite runs on a CPU in seconds (the test
suite does that); `--scale` multiplies the pair and image counts. Every record has "section",
"name", "device", "backend" and its measurements (seconds, pairs/s, images/s).

  python bench/device_suite.py --out device.jsonl               # full size, on a GPU
  python bench/device_suite.py --official ~/src/QAConv --out device.jsonl   # + official modules
  python bench/device_suite.py --tiny --out /tmp/suite.jsonl    # smoke run on a CPU
"""
import argparse
import json
import os
import pathlib
import resource
import sys
import time
import traceback

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):
  if path not in sys.path:
    sys.path.insert(0, path)

SECTIONS = ("qaconv", "transmatcher", "train", "msmt_eval", "memory", "nformer", "kpm", "pat")
MSMT_QUERIES, MSMT_GALLERY, MSMT_IDS, MSMT_CAMS = 11659, 82161, 3060, 15
SET_SIZES = {"market": (3368, 15913), "msmt17": (MSMT_QUERIES, MSMT_GALLERY)}
MEMORY_METHODS = ("qaconv_gs", "transmatcher", "kpm")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="device_suite.jsonl", help="JSON lines are appended here")
  parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
  parser.add_argument("--scale", type=float, default=1.0, help="multiplies pair/image counts")
  parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU smoke)")
  parser.add_argument("--data-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                         "jaxreid_bench_pipeline"),
                      help="where the train section builds its Market-1501 stand-in")
  parser.add_argument("--peak-tflops", "--peak_tflops", type=float, default=989.0,
                      help="the device's dense bf16 peak (H200: 989)")
  parser.add_argument("--reps", type=int, default=2, help="timed repetitions (best is kept)")
  parser.add_argument("--memory-seconds", type=float, default=8.0,
                      help="gallery streaming time per memory case")
  parser.add_argument("--memory-sizes", default=",".join(SET_SIZES),
                      help="comma-separated set sizes of the memory section")
  parser.add_argument("--memory-methods", default=",".join(MEMORY_METHODS),
                      help="comma-separated methods of the memory section")
  parser.add_argument("--memory-chunk", type=int, default=0,
                      help="gallery images per chunk in the memory section (0: the config's)")
  parser.add_argument("--official", help="a ShengcaiLiao/QAConv checkout (or the QAConv folder "
                      "of ShengcaiLiao/TransMatcher): its reid/models/qaconv.py and "
                      "projects/transmatcher/transmatcher.py become the scoring baselines")
  args = parser.parse_args(argv)
  args.only = [s for s in args.only.split(",") if s]
  unknown = set(args.only) - set(SECTIONS)
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
  if not set(args.memory_sizes.split(",")) <= set(SET_SIZES):
    parser.error(f"--memory-sizes takes a comma-separated subset of {', '.join(SET_SIZES)}")
  if not set(args.memory_methods.split(",")) <= set(MEMORY_METHODS):
    parser.error(f"--memory-methods takes a comma-separated subset of {', '.join(MEMORY_METHODS)}")
  return args


def count(args, n, tiny):
  """`n` scaled by --scale (at least 1), or `tiny` under --tiny."""
  return tiny if args.tiny else max(1, int(round(n * args.scale)))


class Recorder:
  """Appends records (with the device named) to the output file and prints them."""

  def __init__(self, path):
    import jax
    self.path = pathlib.Path(path)
    device = jax.devices()[0]
    self.common = {"device": getattr(device, "device_kind", str(device)),
                   "backend": jax.default_backend(), "num_devices": jax.device_count()}

  def __call__(self, section, name, **values):
    values = {k: _significant(v) for k, v in values.items()}
    record = {"section": section, "name": name, **self.common, **values}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def _significant(value):
  """Floats to 4 significant digits (never rounded to 0 unless 0)."""
  return float(f"{value:.4g}") if isinstance(value, float) else value


def timed(fn, reps):
  """(first call's seconds, best of `reps` further calls' seconds, last output); outputs are
  waited for (JAX arrays blocked on, CUDA synchronised)."""
  def once():
    t0 = time.perf_counter()
    out = _wait(fn())
    return time.perf_counter() - t0, out
  first, out = once()
  best = min((once() for _ in range(max(1, reps))), key=lambda x: x[0])
  return first, best[0], best[1]


def _wait(out):
  import jax
  out = jax.block_until_ready(out)
  if "torch" in sys.modules:
    import torch
    if torch.cuda.is_available():
      torch.cuda.synchronize()
  return out


def peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mb():
  """Peak bytes in use on the first device so far (0 where the backend does not say)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("peak_bytes_in_use", 0) / 2**20)


def torch_device():
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------
# 1. QAConv scoring


def qaconv_official_torch(probe, gallery, weights, device, dtype, tile=128):
  """The QAConv v2.1 evaluator's logic (bench/bench_qaconv_scoring.py describes it): the
  matcher called on probe × gallery tiles of `tile` × `tile` maps, channels first, in `dtype`;
  the matcher's eval forward is einsum → max over each side → scalar BN → Linear(hw → 1) →
  sum of the two sides → scalar BN (docs/methods/qaconv.md)."""
  import torch
  torch.set_grad_enabled(False)
  hw = probe.shape[1] * probe.shape[2]
  to = lambda x: torch.from_numpy(np.ascontiguousarray(
      x.reshape(len(x), hw, -1).transpose(0, 2, 1))).to(device, dtype)
  prob, gal = to(probe), to(gallery)
  bn, lbn = weights["bn"], weights["logit_bn"]
  fc_w = torch.from_numpy(weights["fc_kernel"]).to(device, dtype)

  def matcher(p, g):
    score = torch.einsum("pcs,gcr->pgrs", p, g)
    score = torch.cat((score.max(dim=2)[0], score.max(dim=3)[0]), dim=-1).view(-1, hw)
    score = (score - bn["mean"]) / np.sqrt(bn["var"] + 1e-5) * bn["scale"] + bn["bias"]
    score = (score @ fc_w + weights["fc_bias"]).view(-1, 2).sum(dim=1)
    score = (score - lbn["mean"]) / np.sqrt(lbn["var"] + 1e-5) * lbn["scale"] + lbn["bias"]
    return score.view(len(p), len(g))

  def run():
    out = torch.zeros(len(prob), len(gal), dtype=dtype, device=device)
    for i in range(0, len(prob), tile):
      for k in range(0, len(gal), tile):
        out[i:i + tile, k:k + tile] = matcher(prob[i:i + tile], gal[k:k + tile])
    return out
  return run


def section_qaconv(args, record):
  import jax
  import jax.numpy as jnp
  import torch
  import bench_qaconv_scoring as bq
  from jaxreid.eval.scoring import ChunkScorer
  size = (4, 2, 16) if args.tiny else (24, 8, 128)
  ns = argparse.Namespace(height=size[0], width=size[1], dim=size[2], seed=0,
                          probes=count(args, 2048, 16), gallery=count(args, 8192, 32))
  probe, gallery, weights = bq.make_inputs(ns)
  match, variables = bq.jax_scorer(ns, weights)
  pairs = ns.probes * ns.gallery
  hw = size[0] * size[1]
  flops = 2 * hw * hw * size[2] + 2 * hw * hw + 4 * hw     # einsum + both max-poolings + head
  base = dict(P=ns.probes, G=ns.gallery, maps=list(size), pairs=pairs, flops_per_pair=flops)

  def rate(seconds):
    return {"pairs_per_s": float(pairs / seconds),
            "fraction_of_bf16_peak": float(pairs / seconds * flops / (args.peak_tflops * 1e12))}

  results = {}
  tiles = [(64, 256)] if args.tiny else [(64, 256), (256, 1024)]
  for dtype in ("float32", "bfloat16"):
    p = np.asarray(jnp.asarray(probe, dtype)) if dtype == "bfloat16" else probe
    for tile_p, tile_g in tiles:
      scorer = ChunkScorer(match, variables, p, ns.gallery, tile_p=tile_p, tile_g=tile_g)
      chunk = jax.device_put(jnp.asarray(gallery, dtype))
      first, best, out = timed(lambda: scorer.score(chunk, ns.gallery), args.reps)
      results[(dtype, tile_p, tile_g)] = out
      record("qaconv", f"jaxreid_{dtype}", **base, tile_p=tile_p, tile_g=tile_g,
             first_s=float(first), wall_s=float(best), **rate(best))
  device = torch_device()
  tdtype = torch.float16 if device == "cuda" else torch.float32
  ours = results[("float32",) + tiles[0]]
  baselines = [("official_v2.1_logic_torch",
                qaconv_official_torch(probe, gallery, weights, device, tdtype))]
  if args.official:
    baselines.append(("official_qaconv_module", official_qaconv_run(
        args.official, probe, gallery, weights, ns, device, tdtype)))
  for name, run in baselines:
    first, best, out = timed(run, args.reps)
    official = out.float().cpu().numpy()
    record("qaconv", name, **base, dtype=str(tdtype).split(".")[-1], torch_device=device,
           tile=128, first_s=float(first), wall_s=float(best), **rate(best),
           max_abs_diff_vs_jaxreid_f32=float(np.abs(official - ours).max()),
           max_abs_score=float(np.abs(ours).max()))


def official_qaconv_run(root, probe, gallery, weights, ns, device, dtype, tile=128):
  """The official QAConv module driven as the official evaluator's `pairwise_distance`:
  probe × gallery tiles of 128 × 128 maps in `dtype` (the evaluator halves model and matcher on
  a GPU), scores kept in `dtype`. Both module versions: v2.1's make_kernel(probes) +
  forward(gallery), and the later forward(probes, gallery)."""
  import torch
  import bench_qaconv_scoring as bq
  matcher = bq.official_matcher(pathlib.Path(root) / "reid" / "models", weights, ns)
  matcher = matcher.to(device, dtype)
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device,
                                                                                       dtype)
  prob, gal = nchw(probe), nchw(gallery)

  def run():
    with torch.inference_mode():
      out = torch.zeros(len(prob), len(gal), dtype=dtype, device=device)
      for i in range(0, len(prob), tile):
        if hasattr(matcher, "make_kernel"):
          matcher.make_kernel(prob[i:i + tile])
          match = matcher
        else:
          match = lambda g, p=prob[i:i + tile]: matcher(p, g)
        for k in range(0, len(gal), tile):
          out[i:i + tile, k:k + tile] = match(gal[k:k + tile])
      return out
  return run


# ------------------------------------------------------------------------------------------------
# 2. TransMatcher scoring


def section_transmatcher(args, record):
  import jax
  import jax.numpy as jnp
  import torch
  import bench_transmatcher_scoring as bt
  from jaxreid.eval.scoring import ChunkScorer
  ns = argparse.Namespace(height=4 if args.tiny else 24, width=2 if args.tiny else 8,
                          dim=16 if args.tiny else 512, ffn=32 if args.tiny else 2048,
                          layers=2 if args.tiny else 3, seed=0,
                          probes=count(args, 256, 8), gallery=count(args, 1024, 16),
                          torch_chunk=128)
  probe, gallery = bt.make_maps(ns)
  pairs = ns.probes * ns.gallery
  base = dict(P=ns.probes, G=ns.gallery, maps=[ns.layers, ns.height, ns.width, ns.dim],
              D=ns.ffn, pairs=pairs)
  ours = {}
  for dtype in ("float32", "bfloat16"):
    module, variables = bt.transmatcher_variables(ns, dtype)
    match = lambda v, p, g, module=module: module.apply(v, p, g)
    scorer = ChunkScorer(match, variables, probe, ns.gallery, tile_p=32, tile_g=64)
    chunk = jax.device_put(jnp.asarray(gallery))
    first, best, ours[dtype] = timed(lambda: scorer.score(chunk, ns.gallery), args.reps)
    record("transmatcher", f"jaxreid_{dtype}", **base, tile_p=32, tile_g=64,
           first_s=float(first), wall_s=float(best), pairs_per_s=float(pairs / best))
  _, variables = bt.transmatcher_variables(ns, "float32")
  device = torch_device()
  modes = [("float32", None)] + ([("float16_autocast", torch.float16)] if device == "cuda" else [])
  for name, autocast in modes:
    def run():
      outs = []
      for i in range(0, ns.probes, 128):    # probe tiles of 128 keep the S×S products < 3 GB
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
          outs.append(bt.torch_scores(probe[i:i + 128], gallery, variables, ns, device=device))
      return np.concatenate(outs)
    first, best, out = timed(run, args.reps)
    record("transmatcher", f"torch_decoder_{name}", **base, torch_device=device,
           chunk=ns.torch_chunk, first_s=float(first), wall_s=float(best),
           pairs_per_s=float(pairs / best),
           max_abs_diff_vs_jaxreid_f32=float(np.abs(out - ours["float32"]).max()))
  if args.official:
    run = official_transmatcher_run(args.official, probe, gallery, variables, ns, device)
    first, best, out = timed(run, args.reps)
    record("transmatcher", "official_transmatcher_module", **base, torch_device=device,
           dtype="float32", prob_batch=256, gal_batch=256, first_s=float(first),
           wall_s=float(best), pairs_per_s=float(pairs / best),
           max_abs_diff_vs_jaxreid_f32=float(np.abs(out.cpu().numpy() - ours["float32"]).max()))


def official_transmatcher_run(root, probe, gallery, variables, ns, device, batch=256):
  """The official TransMatcher module driven as its evaluator's `evaluate` drives it:
  make_kernel on probe batches of test_prob_batch = 256, the matcher on gallery batches of
  test_fea_batch = 256, float32."""
  import torch
  import bench_transmatcher_scoring as bt
  folder = pathlib.Path(root) / "projects" / "transmatcher"
  matcher = bt.official_matcher(folder, variables, ns).to(device)
  prob, gal = bt.official_maps(probe, ns).to(device), bt.official_maps(gallery, ns).to(device)

  def run():
    with torch.no_grad():
      out = torch.zeros(len(prob), len(gal), device=device)
      for i in range(0, len(prob), batch):
        matcher.make_kernel(prob[i:i + batch])
        for k in range(0, len(gal), batch):
          out[i:i + batch, k:k + batch] = matcher(gal[k:k + batch])
      return out
  return run


# ------------------------------------------------------------------------------------------------
# 3. Training step


def section_train(args, record):
  import jax
  from configs import qaconv_gs
  from jaxreid import parallel, registry
  from jaxreid.train.loop import create_train_state, make_train_step
  from jaxreid.train.optim import make_optimizer
  config = qaconv_gs.get_config("market")
  config.model.pretrained = ""
  if args.tiny:
    config.model.update(depth=18, width=8, neck=16)
    config.data.update(height=64, width=32, batch_size=8)
  batch_size = config.data.batch_size
  num_classes = batch_size // config.data.num_instances
  model = registry.build_model(config)
  objective = registry.method_of(config).objectives[config.train.loss]
  tx = make_optimizer(config.train, steps_per_epoch=100)
  mesh = parallel.make_mesh()
  state = parallel.replicate(create_train_state(config, model, tx, objective, num_classes,
                                                batch_size, jax.random.key(0)), mesh)
  step = parallel.jit_train_step(make_train_step(model, tx, objective, config.train), mesh)
  from jaxreid.data import pipeline
  import bench_input_pipeline
  split = bench_input_pipeline.build_market(args.data_dir, 12 if args.tiny else 120)
  options = config.data.augment.to_dict()
  steps = 3 if args.tiny else 20
  plan = (np.arange((steps + 1) * batch_size) % len(split)).reshape(steps + 1, batch_size)

  def fed_batches():
    return pipeline.train_batches(split, plan, epoch=0, seed=0, height=config.data.height,
                                  width=config.data.width, augment=options,
                                  num_threads=config.data.num_threads,
                                  num_workers=config.data.num_workers,
                                  resize=config.data.get("resize", "bicubic"))

  # Resident: one real batch (resized images + augmentation factors) kept on the devices.
  batch = parallel.shard_batch(next(iter(fed_batches())), mesh)
  holder = [state]

  def run():
    for _ in range(steps):
      holder[0], metrics = step(holder[0], batch)
    return metrics["loss"]
  first, best, loss = timed(run, 1)
  record("train", "jaxreid_qaconv_gs_step", setting="qaconv_gs:market", loss_fn=config.train.loss,
         batch=batch_size, input=[config.data.height, config.data.width],
         backbone=f"resnet{config.model.depth}_ibn_{config.model.ibn}",
         bf16=bool(config.train.bf16), steps=steps, first_s=float(first),
         wall_s=float(best), images_per_s=float(steps * batch_size / best),
         step_ms=float(1000 * best / steps), loss=float(loss), augmentation="in step",
         device_peak_mb=device_peak_mb())
  # Fed: the same step on batches streamed from the real pipeline (TFDS source, decode, resize,
  # factor draws in grain threads / workers), as training runs it.
  resident_rate = steps * batch_size / best
  batches = fed_batches()
  holder[0], metrics = step(holder[0], parallel.shard_batch(next(batches), mesh))
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for host in batches:
    holder[0], metrics = step(holder[0], parallel.shard_batch(host, mesh))
  jax.block_until_ready(metrics)
  fed_rate = steps * batch_size / (time.perf_counter() - t0)
  record("train", "jaxreid_qaconv_gs_step_fed", setting="qaconv_gs:market", batch=batch_size,
         steps=steps, images_per_s=float(fed_rate), resident_images_per_s=float(resident_rate),
         input_bound=bool(fed_rate < 0.95 * resident_rate),
         num_threads_and_workers=list(pipeline.loader_processes(config.data.num_threads,
                                                                 config.data.num_workers)),
         host_cores=os.cpu_count())
  import torch_qaconv_gs_step as tq
  m = config.model
  device = torch_device()
  torch_run = tq.measure(depth=m.depth, width=m.width, neck=m.neck, height=config.data.height,
                         width_px=config.data.width, batch=batch_size, device=device, amp=True,
                         steps=steps)
  record("train", "official_v2.1_step_torch", setting="qaconv_gs:market", batch=batch_size,
         input=[config.data.height, config.data.width], torch_device=device,
         amp="float16" if device == "cuda" else "off", clip_value=tq.CLIP_VALUE,
         margin=tq.MARGIN, steps=steps, **{k: float(v) for k, v in torch_run.items()},
         jaxreid_speedup=float(steps * batch_size / best / torch_run["images_per_s"]))


# ------------------------------------------------------------------------------------------------
# 4. MSMT17-size QAConv evaluation


class _Pool:
  """A split's image source: row i is one of a few random images (decoding costs nothing)."""

  def __init__(self, images):
    self.images = images

  def __getitem__(self, i):
    return {"image": self.images[i % len(self.images)]}

  def __len__(self):
    raise TypeError("sized by the split")


def random_split(name, n, height, width, rng):
  from jaxreid.data.datasets import ReidSplit, relabel
  pids = rng.integers(0, MSMT_IDS, n).astype(np.int32)
  labels, num_classes = relabel(pids)
  images = rng.integers(0, 256, (16, height, width, 3), dtype=np.uint8)
  return ReidSplit(source=_Pool(images), pids=pids, labels=labels,
                   cams=rng.integers(0, MSMT_CAMS, n).astype(np.int32),
                   times=np.full(n, np.nan, np.float32),
                   filenames=[f"{name}_{i}.jpg" for i in range(n)], num_classes=num_classes,
                   name=name)


def section_msmt_eval(args, record):
  import jax
  from configs import qaconv_gs
  from jaxreid import parallel, registry
  from jaxreid.eval import evaluator
  from jaxreid.eval.metrics import evaluate_ranking
  from jaxreid.eval.scoring import ChunkScorer, match_fn
  from jaxreid.models import init_variables
  config = qaconv_gs.get_config("msmt17_all")
  config.model.pretrained = ""
  if args.tiny:
    config.model.update(depth=18, width=8, neck=16)
    config.data.update(height=64, width=32)
    config.eval.update(batch_size=16, tile_p=16, tile_g=32, gallery_chunk=64)
  num_q, num_g = count(args, MSMT_QUERIES, 40), count(args, MSMT_GALLERY, 150)
  rng = np.random.default_rng(0)
  h, w = config.data.height, config.data.width
  query, gallery = random_split("query", num_q, h, w, rng), random_split("gallery", num_g, h, w,
                                                                         rng)
  model = registry.build_model(config)
  variables = init_variables(model, jax.random.key(0), h, w)
  mesh = parallel.make_mesh()
  chunk = evaluator.gallery_chunk(config, num_g)
  times = {}

  t0 = time.perf_counter()
  q = evaluator.extract(model, variables, query, config, mesh)
  times["query_extraction_s"] = time.perf_counter() - t0
  _, maps, _ = next(evaluator.encode_chunks(model, variables, query, config, mesh, chunk))
  scorer = ChunkScorer(match_fn(model), variables, q, chunk, tile_p=config.eval.tile_p,
                       tile_g=config.eval.tile_g, mesh=mesh)
  scorer.score(maps, chunk)                                   # compiled outside the timing
  t0 = time.perf_counter()
  for g0 in range(0, num_g, chunk):                           # every gallery chunk's scoring
    scorer.score(maps, min(chunk, num_g - g0))
  times["scoring_only_s"] = time.perf_counter() - t0
  del scorer, maps
  t0 = time.perf_counter()
  scores, _ = evaluator.streamed_scores(model, variables, q, gallery, config, mesh)
  times["streamed_encoding_and_scoring_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  metrics = evaluate_ranking(scores, query.pids, gallery.pids, query.cams, gallery.cams,
                             max_rank=config.eval.max_rank)
  times["metrics_s"] = time.perf_counter() - t0
  record("msmt_eval", "jaxreid_qaconv_streamed", P=num_q, G=num_g, chunk=chunk,
         input=[h, w], map=list(q.shape[1:]), batch=config.eval.batch_size,
         tile_p=config.eval.tile_p, tile_g=config.eval.tile_g,
         **{k: float(v) for k, v in times.items()},
         scoring_pairs_per_s=float(num_q * num_g / times["scoring_only_s"]),
         query_images_per_s=float(num_q / times["query_extraction_s"]),
         mAP=float(metrics["mAP"]), peak_rss_mb=round(peak_rss_mb()),
         device_peak_mb=device_peak_mb())


def rss_mb():
  """Resident memory now (VmRSS), MB."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return float(line.split()[1]) / 1024
  return 0.0


def device_in_use_mb():
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("bytes_in_use", 0) / 2**20)


def memory_config(method, tiny):
  """The method's paper (Market-trained) setting with random weights; tiny models under --tiny."""
  import importlib
  config = importlib.import_module(f"configs.{method}").get_config("market")
  config.model.pretrained = ""
  if tiny:
    config.model.update(depth=18, width=8)
    config.model.update(**{"qaconv_gs": dict(neck=16),
                           "transmatcher": dict(neck=8, ffn=16, num_layers=2, encoders=1),
                           "kpm": dict(rsa_channels=6)}[method])
    config.data.update(height=64, width=32)
    config.eval.update(batch_size=16, gallery_chunk=32)
  return config


def section_memory(args, record):
  """Streamed evaluation at full set sizes (docs/evaluation.md): memory is probes + one gallery
  chunk + the [P, G] score matrix, whatever G is, so a time-boxed pass over the first chunks
  shows the full run's footprint; `projected_scoring_s` extrapolates its time."""
  import gc
  import jax
  from jaxreid import parallel, registry
  from jaxreid.eval import evaluator
  from jaxreid.eval.scoring import ChunkScorer, match_fn
  from jaxreid.models import init_variables
  mesh = parallel.make_mesh()
  for method in args.memory_methods.split(","):
    config = memory_config(method, args.tiny)
    if args.memory_chunk:
      config.eval.gallery_chunk = args.memory_chunk
    model = registry.build_model(config)
    h, w = config.data.height, config.data.width
    variables = init_variables(model, jax.random.key(0), h, w)
    for size in args.memory_sizes.split(","):
      num_q, num_g = SET_SIZES[size]
      num_q, num_g = (count(args, num_q, 40), count(args, num_g, 150))
      rng = np.random.default_rng(0)
      query, gallery = (random_split("query", num_q, h, w, rng),
                        random_split("gallery", num_g, h, w, rng))
      rss0 = rss_mb()
      t0 = time.perf_counter()
      q = evaluator.extract(model, variables, query, config, mesh)
      extraction_s = time.perf_counter() - t0
      chunk = evaluator.gallery_chunk(config, num_g)
      on_device = evaluator._fits_device(q, config)
      scorer = ChunkScorer(match_fn(model), variables, q, chunk, tile_p=config.eval.tile_p,
                           tile_g=config.eval.tile_g, mesh=mesh, probes_on_device=on_device)
      scores = np.empty((num_q, num_g), np.float32)
      done, chunk_mb, t0 = 0, 0.0, time.perf_counter()
      for start, maps, valid in evaluator.encode_chunks(model, variables, gallery, config, mesh,
                                                        chunk):
        scores[:, start:start + valid] = scorer.score(maps, valid)
        if not done:   # encoded, compiled and scored: the projection starts after it
          first_s, chunk_mb = time.perf_counter() - t0, maps.nbytes / 2**20
          t0 = time.perf_counter()
        done += valid
        if time.perf_counter() - t0 >= args.memory_seconds:
          break
      seconds = time.perf_counter() - t0
      timed_images = done - min(chunk, num_g)
      record("memory", f"jaxreid_{method}_{size}", size=size, P=num_q, G=num_g,
             input=[h, w], map=list(q.shape[1:]), map_bytes=int(q[0].nbytes), chunk=chunk,
             probes_on_device=bool(on_device),
             gallery_done=done, query_extraction_s=float(extraction_s),
             probes_mb=float(q.nbytes / 2**20), chunk_maps_mb=float(chunk_mb),
             score_matrix_mb=float(scores.nbytes / 2**20),
             rss_before_mb=float(rss0), rss_growth_mb=float(rss_mb() - rss0),
             peak_rss_mb=round(peak_rss_mb()),
             device_in_use_mb=device_in_use_mb(), device_peak_mb_so_far=device_peak_mb(),
             first_chunk_s=float(first_s),
             projected_scoring_s=float(num_g * (seconds / timed_images if timed_images > 0
                                                else first_s / min(chunk, num_g))))
      del q, scorer, scores
      gc.collect()


# ------------------------------------------------------------------------------------------------
# 5. NFormer, KPM, PAT


def section_nformer(args, record):
  import bench_nformer_scale as bn
  from jaxreid.methods.nformer.model import nformer_apply
  ns = argparse.Namespace(seed=0, ids=50 if args.tiny else 4000, dim=16 if args.tiny else 256,
                          ffn=32 if args.tiny else 1024, layers=2 if args.tiny else 4,
                          landmarks=5, k=20, heads=2)
  n = count(args, 93820, 300)
  x, params, landmarks, num_queries = bn.make_problem(ns, n)
  run = lambda: nformer_apply(params, x, landmarks, num_queries=num_queries, k=ns.k,
                              heads=ns.heads)
  first, best, _ = timed(run, args.reps)
  record("nformer", "jaxreid_nformer_refine", N=n, dim=ns.dim, layers=ns.layers, k=ns.k,
         first_s=float(first), wall_s=float(best), items_per_s=float(n / best),
         device_peak_mb=device_peak_mb())


def section_kpm(args, record):
  import jax
  import jax.numpy as jnp
  import bench_kpm_scoring as bk
  from jaxreid.eval.scoring import ChunkScorer
  ns = argparse.Namespace(height=2 if args.tiny else 8, width=1 if args.tiny else 4,
                          channels=64 if args.tiny else 2048, scales=3,
                          rsa=16 if args.tiny else 256,
                          seed=0, probes=count(args, 128, 8), gallery=count(args, 512, 16))
  probe, gallery = bk.make_features(ns)
  module, variables = bk.kpm_variables(ns)
  match = lambda v, p, g: module.apply(v, p, g)
  tile_p, tile_g = (4, 8) if args.tiny else (16, 32)
  scorer = ChunkScorer(match, variables, probe, ns.gallery, tile_p=tile_p, tile_g=tile_g)
  chunk = jax.device_put(jnp.asarray(gallery))
  first, best, _ = timed(lambda: scorer.score(chunk, ns.gallery), args.reps)
  pairs = ns.probes * ns.gallery
  record("kpm", "jaxreid_kpm_scoring", P=ns.probes, G=ns.gallery,
         scales=[list(s) for s in bk.shapes(ns)], tile_p=tile_p, tile_g=tile_g,
         first_s=float(first), wall_s=float(best), pairs_per_s=float(pairs / best))


def section_pat(args, record):
  import jax
  from configs import pat
  from jaxreid import parallel, registry
  from jaxreid.eval.evaluator import jitted_encode
  from jaxreid.models import init_variables
  config = pat.get_config("synthetic" if args.tiny else sorted(pat.PAPER)[0])
  config.model.pretrained = ""
  batch = 8 if args.tiny else 128
  model = registry.build_model(config)
  h, w = config.data.height, config.data.width
  variables = init_variables(model, jax.random.key(0), h, w)
  mesh = parallel.make_mesh()
  encode = jitted_encode(model, mesh)
  variables = parallel.replicate(variables, mesh)
  images = parallel.put_global(np.random.default_rng(0).integers(0, 256, (batch, h, w, 3),
                                                                 dtype=np.uint8),
                               parallel.batch_sharded(mesh))
  reps = 2 if args.tiny else 10
  run = lambda: [encode(variables, images) for _ in range(reps)][-1]
  first, best, out = timed(run, args.reps)
  record("pat", "jaxreid_pat_encode", input=[h, w], batch=batch, batches=reps,
         dim=int(out.shape[-1]), first_s=float(first), wall_s=float(best),
         images_per_s=float(reps * batch / best))


def main(argv=None):
  args = parse_args(argv)
  record = Recorder(args.out)
  failed = []
  import torch
  grad_mode = torch.is_grad_enabled()   # the PyTorch baselines turn autograd off; restored
  try:
    for name in args.only:
      t0 = time.perf_counter()
      try:
        globals()[f"section_{name}"](args, record)
      except Exception as e:  # one section's failure is recorded; the others still run
        traceback.print_exc()
        record(name, "error", error=f"{type(e).__name__}: {e}"[:500])
        failed.append(name)
      print(f"# {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
  finally:
    torch.set_grad_enabled(grad_mode)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
