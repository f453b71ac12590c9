"""Drawing local correspondences between a probe and a gallery image (QAConv "interpretability",
TransMatcher Fig. 3): lines from each probe feature-map cell to its best-matching gallery cell;
and rank lists: a query with its top-ranked gallery images, framed by identity.

    out = model.correspondences(probe_maps[:1], gallery_maps[:1])          # [L, 1, 1, h*w]
    image = draw_matches(probe_image, gallery_image, out["probe_to_gallery"][0, 0, 0],
                         out["probe_to_gallery_score"][0, 0, 0], map_size=model.map_size, top=20)
    row = draw_rank_list(query_image, top_gallery_images, top_scores, same_id=[True, False, …])
"""
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)


def _rgb(image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"expected an RGB image HxWx3; got shape {array.shape}.")
  if array.dtype != np.uint8:
    array = np.clip(np.rint(array * 255 if array.max() <= 1.0 else array), 0, 255).astype(np.uint8)
  return Image.fromarray(array, "RGB")


def score_colour(t: float) -> tuple[int, int, int]:
  """Red (t = 0, weakest drawn match) → yellow → green (t = 1, strongest)."""
  t = float(np.clip(t, 0.0, 1.0))
  return (int(round(255 * min(1.0, 2 * (1 - t)))), int(round(255 * min(1.0, 2 * t))), 0)


def cell_centres(map_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
  """Pixel (x, y) centres [h*w, 2] of the cells of an h×w feature map over an image of
  image_size = (height, width) pixels (cell (i, j) covers rows i·H/h … (i+1)·H/h)."""
  h, w = map_size
  height, width = image_size
  ys, xs = np.meshgrid((np.arange(h) + 0.5) * height / h, (np.arange(w) + 0.5) * width / w,
                       indexing="ij")
  return np.stack([xs.ravel(), ys.ravel()], axis=1)


def select_matches(scores, *, threshold: float | None = None, top: int | None = None) -> np.ndarray:
  """Indices of the matches to draw, strongest first: score ≥ threshold, then the `top` best."""
  scores = np.asarray(scores, np.float64).reshape(-1)
  order = np.argsort(-scores, kind="stable")
  if threshold is not None:
    order = order[scores[order] >= threshold]
  if top is not None:
    order = order[:max(int(top), 0)]
  return order


def draw_matches(probe_image, gallery_image, locations, scores, *, map_size,
                 threshold: float | None = None, top: int | None = None, line_width: int = 1,
                 gap: int = 0) -> Image.Image:
  """The probe and gallery images side by side with a line from each probe map cell to the
  centre of its matched gallery cell, a dot at each end; where several drawn matches end in one
  cell their ends are spread around its centre (`spread_endpoints`).

  probe_image / gallery_image: uint8 HxWx3 arrays (or PIL images) of any size; each is mapped to
  the h×w feature map by scaling with its own size. locations [h*w]: the matched gallery cell
  (flat y*w+x) of every probe cell; scores [h*w]: their similarities. Only matches with score ≥
  `threshold` and then the `top` best are drawn, coloured red (weakest drawn) → green
  (strongest); weaker lines are drawn first so the strong ones stay on top. `gap` pixels of
  white separate the images.
  """
  probe, gallery = _rgb(probe_image), _rgb(gallery_image)
  h, w = map_size
  locations = np.asarray(locations).reshape(-1)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if locations.shape != (h * w,) or scores.shape != (h * w,):
    raise ValueError(f"locations and scores must have map_size {h}×{w} = {h * w} entries; got "
                     f"{locations.shape} and {scores.shape}.")
  if locations.size and (locations.min() < 0 or locations.max() >= h * w):
    raise ValueError(f"locations must lie in [0, {h * w}); got [{locations.min()}, "
                     f"{locations.max()}].")
  canvas = Image.new("RGB", (probe.width + gap + gallery.width, max(probe.height, gallery.height)),
                     BACKGROUND)
  canvas.paste(probe, (0, 0))
  offset = probe.width + gap
  canvas.paste(gallery, (offset, 0))
  start = cell_centres(map_size, (probe.height, probe.width))
  chosen = select_matches(scores, threshold=threshold, top=top)
  end = spread_endpoints(cell_centres(map_size, (gallery.height, gallery.width)), locations,
                         chosen, (gallery.height / h, gallery.width / w)) + (offset, 0)
  if chosen.size:
    lo, hi = scores[chosen].min(), scores[chosen].max()
    draw = ImageDraw.Draw(canvas)
    radius = max(2, line_width + 1)
    colour = lambda i: score_colour(1.0 if hi == lo else (scores[i] - lo) / (hi - lo))
    for i in chosen[::-1]:  # weakest first
      draw.line([tuple(start[i]), tuple(end[i])], fill=colour(i), width=line_width)
    for i in chosen[::-1]:  # then the dots, outlined in black, on top of every line
      for x, y in (start[i], end[i]):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour(i),
                     outline=(0, 0, 0))
  return canvas


def spread_endpoints(centres, locations, chosen, cell_size) -> np.ndarray:
  """Pixel (x, y) [len(locations), 2] where each drawn match ends: its gallery cell's centre,
  or, when k > 1 drawn matches end in the same cell (common on small maps such as 2×1 or 4×2),
  k points evenly spaced on a circle of a quarter cell around it, so that every line keeps its
  own end. `cell_size`: the (height, width) of a cell in pixels."""
  end = np.asarray(centres, np.float64)[np.asarray(locations)]
  radius = min(cell_size) / 4
  for cell in np.unique(np.asarray(locations)[chosen]):
    sharing = [i for i in chosen if locations[i] == cell]
    if len(sharing) > 1:
      angles = 2 * np.pi * np.arange(len(sharing)) / len(sharing)
      end[sharing] += radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return end


def colour_legend(width: int, height: int = 10, *, low: str = "weakest drawn",
                  high: str = "strongest drawn") -> Image.Image:
  """The match colour scale (score_colour) as a bar `width` pixels wide, `low` written under its
  red end and `high` under its green end."""
  bar = np.array([score_colour(t) for t in np.linspace(0, 1, max(width, 2))], np.uint8)
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  text_height = max(_text_size(measure, low)[1], _text_size(measure, high)[1]) + 4
  canvas = Image.new("RGB", (max(width, _text_size(measure, f"{low}  {high}")[0]),
                             height + text_height), BACKGROUND)
  canvas.paste(Image.fromarray(np.repeat(bar[None], height, axis=0), "RGB"), (0, 0))
  draw = ImageDraw.Draw(canvas)
  draw.text((0, height + 2), low, fill=(0, 0, 0))
  draw.text((canvas.width - _text_size(measure, high)[0], height + 2), high, fill=(0, 0, 0))
  return canvas


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
  left, top, right, bottom = draw.textbbox((0, 0), text)
  return right - left, bottom - top


def stack_rows(rows: Sequence, labels: Sequence[str] | None = None, *, padding: int = 4,
               title: str | None = None) -> Image.Image:
  """Images (PIL or uint8 arrays) stacked vertically, each under a small text label (Pillow's
  default font), with an optional title on top; rows are left-aligned on white."""
  rows = [_rgb(r) for r in rows]
  labels = list(labels) if labels is not None else [""] * len(rows)
  if len(labels) != len(rows):
    raise ValueError(f"got {len(labels)} labels for {len(rows)} rows.")
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  texts = ([title] if title else []) + labels
  text_height = max([_text_size(measure, t)[1] for t in texts if t] + [0]) + padding
  width = max([r.width for r in rows] + [_text_size(measure, t)[0] for t in texts if t] + [1])
  height = (text_height if title else 0) + sum(
      r.height + padding + (text_height if label else 0) for r, label in zip(rows, labels))
  canvas = Image.new("RGB", (width + 2 * padding, height + padding), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  y = padding
  if title:
    draw.text((padding, y), title, fill=(0, 0, 0))
    y += text_height
  for row, label in zip(rows, labels):
    if label:
      draw.text((padding, y), label, fill=(0, 0, 0))
      y += text_height
    canvas.paste(row, (padding, y))
    y += row.height + padding
  return canvas


SAME_ID = (0, 170, 0)
OTHER_ID = (220, 0, 0)
UNKNOWN_ID = (150, 150, 150)
QUERY = (0, 0, 0)


def _framed(image: Image.Image, colour, border: int) -> Image.Image:
  framed = Image.new("RGB", (image.width + 2 * border, image.height + 2 * border), colour)
  framed.paste(image, (border, border))
  return framed


def draw_rank_list(query_image, gallery_images: Sequence, scores, *, same_id=None,
                   border: int = 4, gap: int = 6, score_format: str = "{:.3g}",
                   query_label: str = "query") -> Image.Image:
  """The query, then its ranked gallery images left to right, each with its score under it.

  Gallery frames are green (`same_id` True: the query's identity), red (False) or grey (None:
  identity unknown); the query's frame is black. Images (PIL or uint8 HxWx3 arrays) may have any
  size; they are top-aligned on white.
  """
  gallery = [_rgb(g) for g in gallery_images]
  scores = np.asarray(scores, np.float64).reshape(-1)
  same = [None] * len(gallery) if same_id is None else list(same_id)
  if len(scores) != len(gallery) or len(same) != len(gallery):
    raise ValueError(f"got {len(gallery)} gallery images, {len(scores)} scores and {len(same)} "
                     "same_id flags; pass one of each per image.")
  colour = lambda s: UNKNOWN_ID if s is None else (SAME_ID if s else OTHER_ID)
  tiles = [_framed(_rgb(query_image), QUERY, border)] + [
      _framed(g, colour(s), border) for g, s in zip(gallery, same)]
  captions = [query_label] + [score_format.format(s) for s in scores]
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  text_height = max(_text_size(measure, t)[1] for t in captions) + 4
  widths = [max(t.width, _text_size(measure, c)[0]) for t, c in zip(tiles, captions)]
  height = max(t.height for t in tiles) + text_height
  canvas = Image.new("RGB", (sum(widths) + gap * (len(tiles) + 1), height + gap), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  x = gap
  for tile, caption, width in zip(tiles, captions, widths):
    canvas.paste(tile, (x, 0))
    draw.text((x, tile.height + 2), caption, fill=(0, 0, 0))
    x += width + gap
  return canvas
