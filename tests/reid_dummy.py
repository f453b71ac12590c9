"""Tiny stand-ins of the real re-id archives, laid out and named exactly like them.

Each `write_<dataset>(manual_dir)` writes small images (colour = identity, so a model can learn
something) plus the archive's non-image clutter, and returns what a build must contain:
{split: [(file name, pid, 0-based camera)]} in file-name (or list) order, junk left out.
"""
import pathlib

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 64, 32


def write_image(path: pathlib.Path, pid: int, camera: int) -> None:
  """A person-ish figure: top and bottom colours from the pid, background from the camera."""
  rng = np.random.default_rng([abs(pid) + 7, camera])
  colours = np.random.default_rng(abs(pid) + 1000).integers(0, 256, (2, 3))
  image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
  image[:] = 40 * camera % 256
  image[8:HEIGHT // 2, 6:WIDTH - 6] = colours[0]
  image[HEIGHT // 2:HEIGHT - 4, 8:WIDTH - 8] = colours[1]
  image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path, quality=90)


def _write_all(folder: pathlib.Path, rows) -> None:
  for name, pid, camera in rows:
    write_image(folder / name, pid, camera)


def market_rows(ids, cameras, sessions, frame0, per_camera=1):
  """Market names: <pid>_c<cam>s<session>_<frame>_<box>.jpg, 1-based cams and sessions."""
  rows = []
  for pid in ids:
    for cam in cameras:
      for k in range(per_camera):
        session = sessions[(pid + cam + k) % len(sessions)]
        frame = frame0 + 1000 * cam + 37 * pid + 5 * k
        rows.append((f"{pid:04d}_c{cam}s{session}_{frame:06d}_{k + 1:02d}.jpg" if pid >= 0 else
                     f"{pid}_c{cam}s{session}_{frame:06d}_{k + 1:02d}.jpg", pid, cam))
  return sorted(rows)


def write_market1501(manual: pathlib.Path, *, train_ids=(2, 7, 10, 15, 22, 31),
                     test_ids=(3, 8, 11), top="Market-1501-v15.09.15") -> dict:
  """bounding_box_train, query, bounding_box_test (with junk -1 and distractors 0000)."""
  root = manual / top
  train = market_rows(train_ids, (1, 2, 3), (1, 2), 100, per_camera=2)
  query = market_rows(test_ids, (1, 2), (1, 2, 3), 400)
  gallery = (market_rows(test_ids, (1, 2, 3), (1, 3), 700, per_camera=2)
             + market_rows((0,), (1, 2), (2,), 900, per_camera=2)
             + market_rows((-1,), (1, 3), (1, 3), 90000))   # late junk: must not shift times
  folders = {"bounding_box_train": train, "query": query, "bounding_box_test": gallery}
  for folder, rows in folders.items():
    _write_all(root / folder, rows)
    (root / folder / "Thumbs.db").write_bytes(b"\0junk")
  (root / "readme.txt").write_text("Market-1501 stand-in\n")
  keep = lambda rows: [(n, p, c - 1) for n, p, c in sorted(rows) if p != -1]
  return {"train": keep(train), "query": keep(query), "gallery": keep(gallery)}


def write_dukemtmc_reid(manual: pathlib.Path, *, train_ids=(1, 5, 9, 12),
                        test_ids=(2, 6), gallery_only=(4000,)) -> dict:
  """DukeMTMC-reID/ with <pid>_c<cam>_f<frame>.jpg; gallery-only distractor identities."""
  root = manual / "DukeMTMC-reID"
  rows = lambda ids, cams, f0: sorted(
      (f"{pid:04d}_c{c}_f{f0 + 1111 * c + 13 * pid:07d}.jpg", pid, c) for pid in ids for c in cams)
  splits = {"train": rows(train_ids, (1, 2, 5, 8), 46000),
            "query": rows(test_ids, (1, 3), 1000),
            "gallery": sorted(rows(test_ids, (2, 4, 7), 2000) + rows(gallery_only, (6,), 3000))}
  for split, folder in (("train", "bounding_box_train"), ("query", "query"),
                        ("gallery", "bounding_box_test")):
    _write_all(root / folder, splits[split])
  (root / "README.md").write_text("DukeMTMC-reID stand-in\n")
  return {s: [(n, p, c - 1) for n, p, c in r] for s, r in splits.items()}


def write_cuhk03_np(manual: pathlib.Path) -> dict:
  """cuhk03-np/{detected,labeled}/... with <pid>_c<cam>_<index>.png; returns per subset."""
  out = {}
  for subset, n in (("detected", 2), ("labeled", 3)):
    rows = lambda ids, cams, k, i0: sorted(
        (f"{pid:04d}_c{c}_{i0 + i}.png", pid, c) for pid in ids for c in cams for i in range(k))
    splits = {"train": rows((1, 4, 6), (1, 2), n, 1), "query": rows((2, 3), (1, 2), 1, 1),
              "gallery": rows((2, 3), (1, 2), n, 2)}
    root = manual / "cuhk03-np" / subset
    for split, folder in (("train", "bounding_box_train"), ("query", "query"),
                          ("gallery", "bounding_box_test")):
      for name, pid, c in splits[split]:
        path = root / folder / name
        write_image(path.with_suffix(".tmp.jpg"), pid, c)
        Image.open(path.with_suffix(".tmp.jpg")).save(path)   # PNG, like the real archive
        path.with_suffix(".tmp.jpg").unlink()
    out[subset] = {s: [(n, p, c - 1) for n, p, c in r] for s, r in splits.items()}
  return out


def write_msmt17(manual: pathlib.Path, *, version="V1") -> dict:
  """MSMT17_V1/{train,test}/<pid>/... (V2: mask_train_v2, mask_test_v2) and the four lists."""
  root = manual / f"MSMT17_{version}"
  train_dir, test_dir = ("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2")

  def rows(ids, cams, day):
    return [(f"{pid:04d}/{pid:04d}_{i:03d}_{c:02d}_0303{day}_{17 * i + c:04d}_0.jpg", pid, c)
            for pid in ids for i, c in enumerate(cams)]
  lists = {"list_train.txt": rows((0, 1, 2), (1, 5, 15), "morning"),
           "list_val.txt": rows((0, 1, 2), (7,), "noon"),
           "list_query.txt": rows((0, 1), (3,), "afternoon"),
           "list_gallery.txt": rows((0, 1, 2), (4, 9), "afternoon")}
  for list_name, entries in lists.items():
    folder = root / (train_dir if list_name in ("list_train.txt", "list_val.txt") else test_dir)
    _write_all(folder, entries)
    (root / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid, _ in entries))
  name = lambda rel: rel.split("/")[-1]
  out = {split: [(name(r), p, c - 1) for r, p, c in lists[f"list_{split}.txt"]]
         for split in ("query", "gallery")}
  out["train"] = [(name(r), p, c - 1)
                  for r, p, c in lists["list_train.txt"] + lists["list_val.txt"]]
  return out


def write_randperson(manual: pathlib.Path, *, nested=True) -> dict:
  """randperson_subset/randperson_subset/<pid>_s<scene>_c<cam>_f<frame>.jpg (train only)."""
  root = manual / "randperson_subset" / ("randperson_subset" if nested else "")
  rows = sorted((f"{pid:06d}_s{s:02d}_c{c:02d}_f{100 * pid + 7 * c + s:06d}.jpg", pid, (s, c))
                for pid in (0, 1, 2, 3) for s, c in ((0, 0), (0, 1), (3, 1), (10, 2)))
  for name, pid, (s, c) in rows:
    write_image(root / name, pid, c)
  return {"train": rows}
