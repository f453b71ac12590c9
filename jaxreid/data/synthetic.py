"""Procedural person re-identification data: drawn people seen by styled cameras over time.

Every image is a function of (seed, domain, pid, camera, frame), so any subset renders the same
bytes in any order. Identities walk in groups of 2-4 along a route of cameras: the members of a
group appear in a camera within seconds of each other and reach the next camera 20-60 s later,
which is the co-occurrence TLift exploits. The query set holds one frame per (test id, camera) for
two cameras of its group's route, so co-walkers are queries of the same camera at nearby times.
"""
from collections.abc import Iterator
import dataclasses

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

HEIGHT, WIDTH = 128, 64
_SS = 2            # supersampling factor of the drawing canvas
_MARGIN = 12       # extra background pixels (canvas scale) on each side, for per-frame shifts
_CH, _CW = HEIGHT * _SS, WIDTH * _SS

# Tags that separate the random streams of the different things drawn from one seed.
_PLAN, _CAMERA, _IDENTITY, _SHOT, _DISTRACTOR = range(1, 6)

RGB = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class DomainStyle:
  """The look of one domain; its cameras and people are drawn from these ranges."""
  salt: int                              # separates the random streams of the domains
  scenes: tuple[str, ...]                # background kinds its cameras choose from
  walls: tuple[RGB, ...]                 # upper background colours
  grounds: tuple[RGB, ...]               # floor colours
  clothes: tuple[RGB, ...]               # palette of clothing colours
  textures: tuple[float, float, float, float, float]  # p(plain, hstripes, vstripes, checks, logo)
  tint: tuple[float, float, float]       # domain-wide colour cast (per-channel gain)
  cast: float                            # per-camera colour cast amplitude around the tint
  light: tuple[float, float]             # per-camera brightness range
  contrast: tuple[float, float]
  blur: tuple[float, float]              # blur radius range (output pixels)
  noise: float                           # pixel noise std (0-255 scale)
  occlusion: float                       # probability that an occluder covers part of a frame
  scale: tuple[float, float]             # person height / image height
  coat: float                            # probability of a long upper garment
  hat: float
  bag: float


DOMAINS: dict[str, DomainStyle] = {
    # Daylight streets and parks; bright, saturated summer clothes; warm cameras.
    "domain_a": DomainStyle(
        salt=11, scenes=("street", "park"),
        walls=((196, 170, 140), (170, 160, 150), (210, 200, 180), (150, 110, 90), (190, 200, 210)),
        grounds=((150, 150, 145), (170, 160, 140), (120, 120, 125)),
        clothes=((220, 40, 40), (240, 200, 40), (40, 90, 200), (30, 160, 70), (245, 245, 240),
                 (30, 30, 35), (240, 130, 30), (150, 60, 170), (110, 180, 230), (230, 120, 160),
                 (120, 90, 60), (140, 140, 145)),
        textures=(0.45, 0.2, 0.1, 0.1, 0.15), tint=(1.06, 1.0, 0.92), cast=0.10,
        light=(0.9, 1.2), contrast=(0.9, 1.15), blur=(0.0, 0.6), noise=3.0, occlusion=0.15,
        scale=(0.80, 0.94), coat=0.1, hat=0.25, bag=0.5),
    # Indoor malls and stations; muted winter coats; cool fluorescent, blurrier, darker cameras.
    "domain_b": DomainStyle(
        salt=23, scenes=("indoor",),
        walls=((200, 205, 215), (120, 130, 150), (225, 220, 200), (90, 100, 90), (160, 150, 170)),
        grounds=((90, 90, 100), (180, 175, 165), (60, 55, 60), (130, 110, 90)),
        clothes=((25, 25, 30), (70, 70, 80), (120, 30, 40), (30, 50, 100), (150, 140, 120),
                 (200, 200, 195), (60, 90, 60), (170, 100, 40), (100, 60, 110), (180, 60, 60),
                 (90, 140, 160), (210, 180, 120)),
        textures=(0.55, 0.15, 0.05, 0.2, 0.05), tint=(0.92, 1.0, 1.1), cast=0.08,
        light=(0.7, 1.0), contrast=(0.8, 1.05), blur=(0.4, 1.2), noise=5.0, occlusion=0.25,
        scale=(0.72, 0.90), coat=0.5, hat=0.35, bag=0.6),
    # Streets at dusk: dark, noisy, orange street light.
    "domain_c": DomainStyle(
        salt=37, scenes=("night",),
        walls=((60, 55, 70), (40, 45, 60), (80, 70, 60)),
        grounds=((50, 50, 55), (70, 65, 60)),
        clothes=((220, 40, 40), (240, 200, 40), (40, 90, 200), (30, 160, 70), (245, 245, 240),
                 (30, 30, 35), (240, 130, 30), (150, 60, 170), (110, 180, 230), (120, 90, 60)),
        textures=(0.5, 0.2, 0.1, 0.1, 0.1), tint=(1.15, 0.95, 0.75), cast=0.12,
        light=(0.55, 0.8), contrast=(0.8, 1.0), blur=(0.3, 1.0), noise=8.0, occlusion=0.2,
        scale=(0.78, 0.92), coat=0.3, hat=0.2, bag=0.5),
}


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng([int(k) for k in key])


def _pick(rng: np.random.Generator, options):
  return options[rng.integers(len(options))]


def _jitter(rng: np.random.Generator, color, amount: float) -> np.ndarray:
  return np.clip(np.asarray(color, np.float32) + rng.normal(0, amount, 3), 0, 255)


def _rgba(color) -> tuple[int, int, int, int]:
  r, g, b = (int(round(float(c))) for c in color)
  return (r, g, b, 255)


# ---------------------------------------------------------------------------------------------
# Cameras


@dataclasses.dataclass(frozen=True)
class _Camera:
  background: Image.Image   # RGB, canvas size plus _MARGIN on each side
  ground_y: float           # canvas row of the feet baseline
  gain: np.ndarray          # per-channel gain (colour cast x brightness)
  contrast: float
  blur: float
  noise: float
  scale: float              # mean person height / image height
  x_bias: float             # mean horizontal offset of the person (canvas pixels)
  front: float              # probability of seeing a person from the front
  mirror: float             # probability of a person walking the other way (mirrored)
  occluder: RGB
  occlusion: float


def _background(style: DomainStyle, rng: np.random.Generator) -> tuple[np.ndarray, float]:
  """A scene drawn once per camera: upper wall/sky part, floor, some structure."""
  h, w = _CH + 2 * _MARGIN, _CW + 2 * _MARGIN
  scene = _pick(rng, style.scenes)
  wall = _jitter(rng, _pick(rng, style.walls), 12)
  ground = _jitter(rng, _pick(rng, style.grounds), 10)
  horizon = int(h * rng.uniform(0.45, 0.65))
  img = Image.new("RGB", (w, h), _rgba(wall)[:3])
  d = ImageDraw.Draw(img)
  if scene == "park":
    sky = _jitter(rng, (150, 190, 230), 15)
    for y in range(horizon):
      d.line([(0, y), (w, y)], fill=_rgba(sky * (0.85 + 0.15 * y / horizon))[:3])
    for _ in range(rng.integers(2, 5)):
      cx, r = rng.uniform(0, w), rng.uniform(20, 45)
      d.ellipse([cx - r, horizon - 2.2 * r, cx + r, horizon + 0.2 * r],
                fill=_rgba(_jitter(rng, (50, 110, 50), 20))[:3])
    d.rectangle([0, horizon, w, h], fill=_rgba(_jitter(rng, (90, 150, 70), 15))[:3])
    path_top = horizon + 0.35 * (h - horizon)
    d.polygon([(0.3 * w, path_top), (0.7 * w, path_top), (w, h), (0, h)], fill=_rgba(ground)[:3])
    return np.asarray(img, np.float32), float(path_top + 0.55 * (h - path_top))
  if scene == "street":
    pane = wall * rng.uniform(0.45, 0.7)
    cols, rows = rng.integers(2, 4), rng.integers(2, 4)
    for i in range(cols):
      for j in range(rows):
        x0 = (i + 0.2) * w / cols
        y0 = (j + 0.15) * horizon / rows
        d.rectangle([x0, y0, x0 + 0.55 * w / cols, y0 + 0.6 * horizon / rows],
                    fill=_rgba(pane)[:3])
    d.rectangle([0, horizon, w, h], fill=_rgba(ground)[:3])
    for y in np.linspace(horizon, h, 6)[1:]:
      d.line([(0, y), (w, y)], fill=_rgba(ground * 0.85)[:3], width=2)
    d.rectangle([0, horizon - 3, w, horizon + 3], fill=_rgba(ground * 0.7)[:3])
  elif scene == "indoor":
    accent = _jitter(rng, _pick(rng, style.clothes), 20)
    for x in np.arange(rng.uniform(0, 40), w, rng.uniform(30, 55)):
      d.line([(x, 0), (x, horizon)], fill=_rgba(wall * 0.8)[:3], width=3)
    x0 = rng.uniform(0, 0.6 * w)
    d.rectangle([x0, 0.2 * horizon, x0 + rng.uniform(40, 80), 0.85 * horizon], fill=_rgba(accent)[:3])
    d.rectangle([0, horizon, w, h], fill=_rgba(ground)[:3])
    tile = rng.uniform(16, 28)
    for i, y in enumerate(np.arange(horizon, h, tile)):
      for k, x in enumerate(np.arange(0, w, tile)):
        if (i + k) % 2:
          d.rectangle([x, y, x + tile, y + tile], fill=_rgba(ground * 0.88)[:3])
  else:  # night
    lit = _jitter(rng, (250, 210, 120), 10)
    for i in range(rng.integers(3, 6)):
      x0, y0 = rng.uniform(0, w - 20), rng.uniform(0, horizon - 25)
      d.rectangle([x0, y0, x0 + rng.uniform(12, 26), y0 + rng.uniform(14, 26)],
                  fill=_rgba(lit * rng.uniform(0.6, 1.0))[:3])
    d.rectangle([0, horizon, w, h], fill=_rgba(ground)[:3])
    lamp_x = rng.uniform(0.1, 0.9) * w
    glow = np.exp(-((np.arange(w) - lamp_x) / (0.35 * w)) ** 2)
    arr = np.asarray(img, np.float32) * (0.7 + 0.6 * glow[None, :, None])
    return arr, float(horizon + rng.uniform(0.6, 0.8) * (h - horizon))
  return np.asarray(img, np.float32), float(horizon + rng.uniform(0.6, 0.8) * (h - horizon))


def _make_camera(style: DomainStyle, cam: int, seed: int) -> _Camera:
  rng = _rng(seed, style.salt, _CAMERA, cam)
  background, ground_y = _background(style, rng)
  gain = np.asarray(style.tint) * (1 + rng.uniform(-style.cast, style.cast, 3))
  return _Camera(
      background=Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB"),
      ground_y=ground_y,
      gain=(gain * rng.uniform(*style.light)).astype(np.float32),
      contrast=float(rng.uniform(*style.contrast)),
      blur=float(rng.uniform(*style.blur)),
      noise=style.noise,
      scale=float(rng.uniform(*style.scale)),
      x_bias=float(rng.uniform(-8, 8)),
      front=float(rng.choice([0.15, 0.5, 0.85])),
      mirror=float(rng.choice([0.2, 0.5, 0.8])),
      occluder=tuple(int(c) for c in _jitter(rng, _pick(rng, style.walls), 40) * 0.6),
      occlusion=style.occlusion * rng.uniform(0.5, 1.5),
  )


# ---------------------------------------------------------------------------------------------
# Identities and drawing


@dataclasses.dataclass(frozen=True)
class _Identity:
  height: float             # relative body height
  build: float              # relative body width
  legs: float               # leg length / body height
  skin: np.ndarray
  hair: np.ndarray
  long_hair: bool
  upper: np.ndarray
  upper2: np.ndarray        # second colour of the texture
  texture: str
  period: float             # texture period (fraction of body height)
  short_sleeves: bool
  coat: bool
  lower: np.ndarray
  lower_kind: str           # trousers | shorts | skirt
  shoes: np.ndarray
  hat: np.ndarray | None
  bag: str                  # none | backpack | shoulder | hand
  bag_color: np.ndarray
  bag_side: int             # +1 right, -1 left (before mirroring)


_TEXTURES = ("plain", "hstripes", "vstripes", "checks", "logo")
_SKINS = ((250, 215, 185), (230, 185, 150), (190, 140, 100), (140, 95, 65), (95, 65, 45))
_HAIRS = ((30, 25, 20), (70, 45, 25), (130, 90, 50), (200, 170, 110), (150, 150, 150))


def _make_identity(style: DomainStyle, rng: np.random.Generator) -> _Identity:
  clothes = style.clothes
  upper = rng.integers(len(clothes))
  upper2 = (upper + rng.integers(1, len(clothes))) % len(clothes)
  coat = bool(rng.random() < style.coat)
  lower_kind = "trousers" if coat else str(rng.choice(["trousers", "shorts", "skirt"], p=[.65, .2, .15]))
  return _Identity(
      height=float(rng.uniform(0.88, 1.0)),
      build=float(rng.uniform(0.85, 1.2)),
      legs=float(rng.uniform(0.44, 0.52)),
      skin=_jitter(rng, _pick(rng, _SKINS), 6),
      hair=_jitter(rng, _pick(rng, _HAIRS), 6),
      long_hair=bool(rng.random() < 0.3),
      upper=_jitter(rng, clothes[upper], 10),
      upper2=_jitter(rng, clothes[upper2], 10),
      texture=str(rng.choice(_TEXTURES, p=style.textures)),
      period=float(rng.uniform(0.035, 0.07)),
      short_sleeves=bool(not coat and rng.random() < 0.4),
      coat=coat,
      lower=_jitter(rng, _pick(rng, clothes), 10),
      lower_kind=lower_kind,
      shoes=_jitter(rng, _pick(rng, ((30, 30, 30), (240, 240, 240), (110, 70, 40))), 8),
      hat=_jitter(rng, _pick(rng, clothes), 10) if rng.random() < style.hat else None,
      bag=str(rng.choice(["backpack", "shoulder", "hand"])) if rng.random() < style.bag else "none",
      bag_color=_jitter(rng, _pick(rng, clothes), 10),
      bag_side=int(rng.choice([-1, 1])),
  )


def _paste_texture(layer: Image.Image, ident: _Identity, polygon: list, anchor: tuple[float, float],
                   unit: float) -> None:
  """Fills `polygon` with the upper garment's pattern, anchored at the torso's (centre, top)."""
  xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
  x0, y0 = max(int(min(xs)), 0), max(int(min(ys)), 0)
  x1, y1 = min(int(max(xs)) + 2, _CW), min(int(max(ys)) + 2, _CH)
  if x1 <= x0 or y1 <= y0:
    return
  if ident.texture in ("plain", "logo"):
    ImageDraw.Draw(layer).polygon(polygon, fill=_rgba(ident.upper))
    return
  period = ident.period * unit
  yy = np.floor((np.arange(y0, y1)[:, None] - anchor[1]) / period)
  xx = np.floor((np.arange(x0, x1)[None, :] - anchor[0]) / period)
  second = {"hstripes": yy + 0 * xx, "vstripes": xx + 0 * yy, "checks": xx + yy}[ident.texture] % 2
  rgb = np.where(second[..., None] == 1, ident.upper2, ident.upper).astype(np.uint8)
  mask = Image.new("L", (x1 - x0, y1 - y0), 0)
  ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in polygon], fill=255)
  layer.paste(Image.fromarray(rgb, "RGB"), (x0, y0), mask)


def _draw_person(ident: _Identity, cx: float, feet: float, unit: float, front: bool,
                 phase: float) -> Image.Image:
  """An RGBA layer with the person; `unit` is the body height in canvas pixels."""
  layer = Image.new("RGBA", (_CW, _CH), (0, 0, 0, 0))
  d = ImageDraw.Draw(layer)
  u = unit * ident.height
  b = ident.build
  top = feet - u
  rh = 0.068 * u
  head_y = top + rh
  shoulder_y = top + 2 * rh + 0.025 * u
  hip_y = feet - ident.legs * u
  sw, hw = 0.25 * u * b, 0.19 * u * b
  torso_end = hip_y + (0.2 * u if ident.coat else 0.03 * u)
  skin, upper = _rgba(ident.skin), _rgba(ident.upper)

  # Legs (walking: feet apart by a phase-dependent stride), shoes.
  stride = 0.05 * u * np.sin(phase)
  leg_w = 0.085 * u * b
  knee_y = hip_y + 0.5 * (feet - hip_y)
  for side, step in ((-1, stride), (1, -stride)):
    hx, fx = cx + side * hw / 4, cx + side * (0.07 * u) + step
    quad = [(hx - leg_w / 2, hip_y), (hx + leg_w / 2, hip_y), (fx + leg_w / 2.6, feet - 0.02 * u),
            (fx - leg_w / 2.6, feet - 0.02 * u)]
    d.polygon(quad, fill=skin if ident.lower_kind == "skirt" else _rgba(ident.lower))
    if ident.lower_kind == "shorts":
      t = (knee_y - hip_y) / (feet - hip_y)
      kx = hx + t * (fx - hx)
      d.polygon([(kx - leg_w / 2.2, knee_y), (kx + leg_w / 2.2, knee_y), quad[2], quad[3]], fill=skin)
    d.ellipse([fx - 0.05 * u, feet - 0.035 * u, fx + 0.05 * u, feet + 0.01 * u],
              fill=_rgba(ident.shoes))
  if ident.lower_kind == "skirt":
    d.polygon([(cx - hw / 2, hip_y - 0.02 * u), (cx + hw / 2, hip_y - 0.02 * u),
               (cx + hw * 0.8, knee_y), (cx - hw * 0.8, knee_y)], fill=_rgba(ident.lower))

  # Long hair behind the shoulders (seen from the back it is in front, drawn later).
  if ident.long_hair and front:
    d.rectangle([cx - rh, head_y, cx + rh, shoulder_y + 0.06 * u], fill=_rgba(ident.hair))

  # Torso with its texture.
  torso = [(cx - sw / 2, shoulder_y), (cx + sw / 2, shoulder_y),
           (cx + hw / 2 + (0.03 * u if ident.coat else 0), torso_end),
           (cx - hw / 2 - (0.03 * u if ident.coat else 0), torso_end)]
  _paste_texture(layer, ident, torso, (cx, shoulder_y), u)
  if ident.texture == "logo" and front:
    s = 0.05 * u
    d.rectangle([cx - s, shoulder_y + 0.05 * u, cx + s, shoulder_y + 0.05 * u + 1.6 * s],
                fill=_rgba(ident.upper2))
  if ident.bag == "backpack" and front:
    for side in (-1, 1):
      x = cx + side * sw * 0.28
      d.line([(x, shoulder_y), (x, shoulder_y + 0.16 * u)], fill=_rgba(ident.bag_color),
             width=max(1, int(0.025 * u)))
  if ident.bag == "shoulder":
    s = ident.bag_side
    d.line([(cx - s * sw * 0.4, shoulder_y), (cx + s * hw * 0.55, hip_y - 0.02 * u)],
           fill=_rgba(ident.bag_color), width=max(1, int(0.02 * u)))

  # Arms swing against the legs; short sleeves end at the elbow.
  arm_w = max(2, int(0.07 * u * b))
  for side in (-1, 1):
    sx = cx + side * (sw / 2 - arm_w / 3)
    hand = (cx + side * (sw / 2 + 0.03 * u) + 0.015 * u * np.sin(phase), hip_y + 0.02 * u)
    elbow = (sx + 0.5 * (hand[0] - sx), shoulder_y + 0.5 * (hand[1] - shoulder_y))
    d.line([(sx, shoulder_y + arm_w / 3), hand], fill=skin if ident.short_sleeves else upper,
           width=arm_w)
    if ident.short_sleeves:
      d.line([(sx, shoulder_y + arm_w / 3), elbow], fill=upper, width=arm_w)
    d.ellipse([hand[0] - arm_w / 2, hand[1] - arm_w / 2, hand[0] + arm_w / 2, hand[1] + arm_w / 2],
              fill=skin)
    if ident.bag == "hand" and side == ident.bag_side:
      d.rectangle([hand[0] - 0.05 * u, hand[1], hand[0] + 0.05 * u, hand[1] + 0.11 * u],
                  fill=_rgba(ident.bag_color))
  if ident.bag == "shoulder":
    x = cx + ident.bag_side * hw * 0.6
    d.rectangle([x - 0.06 * u, hip_y - 0.06 * u, x + 0.06 * u, hip_y + 0.05 * u],
                fill=_rgba(ident.bag_color))

  # Neck, head, hair, hat.
  d.rectangle([cx - 0.3 * rh, head_y + 0.7 * rh, cx + 0.3 * rh, shoulder_y + 0.01 * u], fill=skin)
  d.ellipse([cx - 0.85 * rh, head_y - rh, cx + 0.85 * rh, head_y + rh],
            fill=skin if front else _rgba(ident.hair))
  if front:
    d.chord([cx - 0.9 * rh, head_y - 1.05 * rh, cx + 0.9 * rh, head_y + 0.5 * rh], 180, 360,
            fill=_rgba(ident.hair))
  elif ident.long_hair:
    d.rectangle([cx - rh, head_y, cx + rh, shoulder_y + 0.06 * u], fill=_rgba(ident.hair))
  if ident.hat is not None:
    d.chord([cx - 0.95 * rh, head_y - 1.2 * rh, cx + 0.95 * rh, head_y + 0.3 * rh], 180, 360,
            fill=_rgba(ident.hat))
    d.rectangle([cx - 1.2 * rh, head_y - 0.25 * rh, cx + 1.2 * rh, head_y - 0.05 * rh],
                fill=_rgba(ident.hat * 0.8))
  if ident.bag == "backpack" and not front:
    d.rounded_rectangle([cx - sw * 0.36, shoulder_y + 0.03 * u, cx + sw * 0.36, hip_y - 0.01 * u],
                        radius=0.03 * u, fill=_rgba(ident.bag_color))

  # Side lighting: the body edges are darker.
  shade = np.full((1, _CW, 4), 255, np.uint8)
  shade[0, :, :3] = (200 + 55 * np.cos(np.clip((np.arange(_CW) - cx) / (0.5 * sw), -1.5, 1.5)))[:, None]
  return ImageChops.multiply(layer, Image.fromarray(shade, "RGBA").resize((_CW, _CH)))


def _render(cam: _Camera, ident: _Identity, rng: np.random.Generator, time: float) -> np.ndarray:
  """One frame of `ident` in `cam`; `rng` draws the pose, placement and noise of this frame."""
  unit = _CH * cam.scale * rng.uniform(0.93, 1.05)
  feet = min(cam.ground_y - _MARGIN + rng.uniform(-4, 4), _CH - 3)
  front = rng.random() < cam.front
  mirror = rng.random() < cam.mirror
  cx = _CW / 2 + cam.x_bias + rng.uniform(-6, 6)
  person = _draw_person(ident, cx, feet, unit, front, phase=2 * np.pi * (time / 1.1 % 1))
  if mirror:
    person = person.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

  dy, dx = rng.integers(0, 2 * _MARGIN + 1, 2)
  img = cam.background.crop((dx, dy, dx + _CW, dy + _CH))
  shadow = Image.new("L", (_CW, _CH), 0)
  ImageDraw.Draw(shadow).ellipse([_CW / 2 - 0.15 * unit, feet - 0.02 * unit,
                                  _CW / 2 + 0.15 * unit, feet + 0.025 * unit], fill=90)
  img.paste((0, 0, 0), (0, 0), shadow)
  img.paste(person, (0, 0), person)

  if rng.random() < cam.occlusion:  # a pole, a railing or a passer-by in front of the person
    d = ImageDraw.Draw(img)
    kind = rng.integers(3)
    if kind == 0:
      x = rng.uniform(0, _CW)
      d.rectangle([x, 0, x + rng.uniform(8, 20), _CH], fill=cam.occluder)
    elif kind == 1:
      y = rng.uniform(0.55, 0.8) * _CH
      d.rectangle([0, y, _CW, _CH], fill=cam.occluder)
    else:
      x = rng.choice([-0.15, 0.85]) * _CW
      d.ellipse([x, 0.3 * _CH, x + 0.35 * _CW, 1.3 * _CH],
                fill=tuple(int(c) for c in rng.integers(20, 200, 3)))

  img = img.reduce(_SS)  # box-filter supersampling
  if cam.blur > 0.05:
    img = img.filter(ImageFilter.BoxBlur(cam.blur))
  arr = np.asarray(img, np.float32) * cam.gain
  mean = arr.mean()
  arr = (arr - mean) * cam.contrast + mean
  arr += cam.noise * rng.standard_normal(arr.shape, np.float32)
  return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Who is where, when


@dataclasses.dataclass(frozen=True)
class Shot:
  """One image to render."""
  pid: int
  camera: int
  time: float
  index: int                 # frame number of this (pid, camera); distractor number for pid 0
  split: str


def _walks(rng: np.random.Generator, pids: np.ndarray, num_cameras: int, time_span: float,
           frames: tuple[int, int]) -> list[tuple[list[int], list[int], dict]]:
  """Groups of 2-4 ids, each with its camera route and {(pid, cam): [times]}."""
  order = rng.permutation(pids)
  sizes = []
  while sum(sizes) < len(order):
    sizes.append(int(rng.integers(2, 5)))
  groups, start = [], 0
  for size in sizes:
    members = [int(p) for p in order[start:start + size]]
    start += size
    route = [int(c) for c in rng.choice(num_cameras, rng.integers(2, min(4, num_cameras) + 1),
                                        replace=False)]
    arrive = rng.uniform(0, time_span)
    lag = {p: rng.uniform(0, 6) for p in members}   # walking order within the group
    times = {}
    for cam in route:
      for p in members:
        n = int(rng.integers(frames[0], frames[1] + 1))
        t0 = arrive + lag[p] + rng.uniform(-1, 1)
        times[(p, cam)] = list(t0 + np.cumsum(rng.uniform(0.4, 1.5, n)))
      arrive += rng.uniform(20, 60)
    groups.append((members, route, times))
  return groups


def plan(*, num_train_ids: int = 150, num_test_ids: int = 100, num_cameras: int = 6,
         num_distractors: int = 40, frames_per_camera: tuple[int, int] = (2, 4),
         time_span: float = 3600.0, seed: int = 0, salt: int = 0) -> dict[str, list[Shot]]:
  """The shots of every split, without pixels; `salt` is the domain's."""
  if num_cameras < 2:
    raise ValueError(f"synthetic_reid needs at least 2 cameras, got num_cameras={num_cameras}.")
  rng = _rng(seed, salt, _PLAN)
  ids = rng.permutation(np.arange(1, num_train_ids + num_test_ids + 1))
  train_ids, test_ids = np.sort(ids[:num_train_ids]), np.sort(ids[num_train_ids:])
  shots = {"train": [], "query": [], "gallery": []}
  for members, _, times in _walks(rng, train_ids, num_cameras, time_span, frames_per_camera):
    for (p, cam), ts in times.items():
      shots["train"] += [Shot(p, cam, float(t), k, "train") for k, t in enumerate(ts)]
  for members, route, times in _walks(rng, test_ids, num_cameras, time_span, frames_per_camera):
    query_cams = rng.choice(route, 2, replace=False)  # shared by the group: co-walkers co-occur
    for (p, cam), ts in times.items():
      q = int(rng.integers(len(ts))) if cam in query_cams else -1
      for k, t in enumerate(ts):
        shots["query" if k == q else "gallery"].append(Shot(p, cam, float(t), k, "test"))
  for k in range(num_distractors):
    shots["gallery"].append(Shot(0, int(rng.integers(num_cameras)),
                                 float(rng.uniform(0, time_span)), k, "test"))
  for split in shots:
    shots[split].sort(key=lambda s: (s.pid, s.camera, s.time, s.index))
  return shots


def filename(shot: Shot) -> str:
  """Market-style name: pid, camera (1-based), frame at 25 fps, per-(pid, camera) number."""
  return f"{shot.pid:04d}_c{shot.camera + 1}_f{int(round(shot.time * 25)):06d}_{shot.index:02d}.png"


def generate(domain: str, split: str, *, num_train_ids: int = 150, num_test_ids: int = 100,
             num_cameras: int = 6, num_distractors: int = 40,
             frames_per_camera: tuple[int, int] = (2, 4), time_span: float = 3600.0,
             seed: int = 0) -> Iterator[dict]:
  """Yields the examples of one split ("train", "query", "gallery"), sorted by file name.

  Train and test ids are disjoint positive ints; the gallery also holds `num_distractors`
  images of pid 0, each a different random person.
  """
  if domain not in DOMAINS:
    raise ValueError(f"Unknown synthetic domain {domain!r}; choose one of {sorted(DOMAINS)}.")
  if split not in ("train", "query", "gallery"):
    raise ValueError(f"Unknown split {split!r}; choose train, query or gallery.")
  style = DOMAINS[domain]
  shots = plan(num_train_ids=num_train_ids, num_test_ids=num_test_ids, num_cameras=num_cameras,
               num_distractors=num_distractors, frames_per_camera=frames_per_camera,
               time_span=time_span, seed=seed, salt=style.salt)[split]
  cameras = [_make_camera(style, c, seed) for c in range(num_cameras)]
  identities = {}
  for shot in shots:
    if shot.pid == 0:
      ident = _make_identity(style, _rng(seed, style.salt, _DISTRACTOR, shot.index))
    else:
      if shot.pid not in identities:
        identities[shot.pid] = _make_identity(style, _rng(seed, style.salt, _IDENTITY, shot.pid))
      ident = identities[shot.pid]
    rng = _rng(seed, style.salt, _SHOT, shot.pid, shot.camera, shot.index,
               0 if shot.pid else 1)
    yield {
        "image": _render(cameras[shot.camera], ident, rng, shot.time),
        "pid": shot.pid,
        "camera": shot.camera,
        "time": shot.time,
        "filename": filename(shot),
    }
