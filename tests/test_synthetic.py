"""The synthetic data: determinism, split protocol, signal in appearance and time, TFDS round trip."""
import itertools

import numpy as np
from PIL import Image
import pytest

from jaxreid.data import synthetic
from jaxreid.data.datasets import load_split
from tfds_builders.synthetic_reid import synthetic_reid_dataset_builder as builder_lib

SMALL = dict(num_train_ids=16, num_test_ids=12, num_cameras=4, num_distractors=3)


def _examples(domain="domain_a", split="train", seed=0, **kwargs):
  return list(synthetic.generate(domain, split, seed=seed, **{**SMALL, **kwargs}))


@pytest.fixture(scope="module")
def synthetic_splits():
  return {split: _examples(split=split) for split in ("train", "query", "gallery")}


def test_deterministic_from_seed():
  a, b, c = _examples(split="query"), _examples(split="query"), _examples(split="query", seed=1)
  assert [e["filename"] for e in a] == [e["filename"] for e in b]
  assert all(x["image"].tobytes() == y["image"].tobytes() for x, y in zip(a, b))
  assert [e["time"] for e in a] == [e["time"] for e in b]
  assert np.concatenate([e["image"] for e in a]).tobytes() != \
      np.concatenate([e["image"] for e in c[:len(a)]]).tobytes()


def test_example_format(synthetic_splits):
  for split, examples in synthetic_splits.items():
    assert examples, split
    for e in examples:
      assert e["image"].shape == (128, 64, 3) and e["image"].dtype == np.uint8
      assert 0 <= e["camera"] < SMALL["num_cameras"] and e["time"] >= 0
    names = [e["filename"] for e in examples]
    assert len(set(names)) == len(names)


def test_protocol(synthetic_splits):
  train = {e["pid"] for e in synthetic_splits["train"]}
  query = {e["pid"] for e in synthetic_splits["query"]}
  gallery = {e["pid"] for e in synthetic_splits["gallery"]}
  assert len(train) == SMALL["num_train_ids"] and len(query) == SMALL["num_test_ids"]
  assert min(train) > 0 and min(query) > 0 and not train & (query | gallery)
  assert gallery - query == {0}
  assert sum(e["pid"] == 0 for e in synthetic_splits["gallery"]) == SMALL["num_distractors"]
  seen = {(e["pid"], e["camera"]) for e in synthetic_splits["gallery"]}
  per_id_cam = [(e["pid"], e["camera"]) for e in synthetic_splits["query"]]
  assert len(per_id_cam) == len(set(per_id_cam)) == 2 * SMALL["num_test_ids"]
  for pid, cam in per_id_cam:
    assert any(p == pid and c != cam for p, c in seen), (pid, cam)


def test_same_id_images_are_closer_than_different_ids(synthetic_splits):
  examples = synthetic_splits["train"]
  small = np.stack([np.asarray(Image.fromarray(e["image"]).resize((16, 32), Image.BOX),
                               np.float32).ravel() for e in examples])
  pids = np.array([e["pid"] for e in examples])
  dist = np.sqrt(((small[:, None] - small[None]) ** 2).sum(-1))
  same = pids[:, None] == pids[None]
  off_diagonal = ~np.eye(len(pids), dtype=bool)
  assert dist[same & off_diagonal].mean() < 0.95 * dist[~same].mean()


def test_co_walkers_cooccur_in_every_camera(synthetic_splits):
  """Ids seen within 15 s in one camera are also close in time in their other cameras."""
  examples = synthetic_splits["query"] + synthetic_splits["gallery"]
  times = {}
  for e in examples:
    if e["pid"]:
      times.setdefault((e["pid"], e["camera"]), []).append(e["time"])
  mean = {k: np.mean(v) for k, v in times.items()}
  pids = sorted({p for p, _ in mean})
  together = []
  for a, b in itertools.combinations(pids, 2):
    shared = [c for c in range(SMALL["num_cameras"]) if (a, c) in mean and (b, c) in mean]
    for c1, c2 in itertools.permutations(shared, 2):
      if abs(mean[a, c1] - mean[b, c1]) < 15:
        together.append(abs(mean[a, c2] - mean[b, c2]))
  all_pairs = [abs(mean[a, c] - mean[b, c]) for a, b in itertools.combinations(pids, 2)
               for c in range(SMALL["num_cameras"]) if (a, c) in mean and (b, c) in mean]
  assert len(together) >= 5
  assert np.median(together) < 15 and np.median(all_pairs) > 100


def _config(domain):
  return builder_lib.SyntheticReidConfig(name=f"small_{domain}", domain=domain, **SMALL)


@pytest.mark.parametrize("domain", ["domain_a", "domain_b"])
def test_tfds_round_trip(tmp_path, domain):
  config = _config(domain)
  builder = builder_lib.Builder(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare(file_format="array_record")
  for split in ("train", "query", "gallery"):
    expected = _examples(domain, split)
    loaded = load_split("synthetic_reid", split, data_dir=str(tmp_path), config=config,
                        build_if_missing=False)
    assert len(loaded) == len(expected) == builder.info.splits[split].num_examples
    assert loaded.pids.dtype == loaded.labels.dtype == loaded.cams.dtype == np.int32
    assert loaded.times.dtype == np.float32
    np.testing.assert_array_equal(loaded.pids, [e["pid"] for e in expected])
    np.testing.assert_array_equal(loaded.cams, [e["camera"] for e in expected])
    np.testing.assert_allclose(loaded.times, [e["time"] for e in expected], rtol=1e-6)
    assert loaded.filenames == [e["filename"] for e in expected]
    assert loaded.num_classes == len(set(loaded.pids.tolist()))
    assert sorted(set(loaded.labels.tolist())) == list(range(loaded.num_classes))
    for i in (0, len(loaded) - 1):
      row = loaded.source[i]
      assert row["image"].dtype == np.uint8 and row["image"].shape == (128, 64, 3)
      np.testing.assert_array_equal(row["image"], expected[i]["image"])  # PNG is lossless
      assert row["filename"] == expected[i]["filename"]


def test_load_split_builds_when_missing_and_domains_differ(tmp_path):
  a = load_split("synthetic_reid", "query", data_dir=str(tmp_path), config=_config("domain_a"))
  b = load_split("synthetic_reid", "query", data_dir=str(tmp_path), config=_config("domain_b"))
  assert a.name == "synthetic_reid/small_domain_a:query"
  mean_a = np.mean([a.source[i]["image"].mean((0, 1)) for i in range(len(a))], 0)
  mean_b = np.mean([b.source[i]["image"].mean((0, 1)) for i in range(len(b))], 0)
  assert np.abs(mean_a - mean_b).max() > 10  # the domains have different colour statistics


def test_load_split_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="market1501.*build it"):
    load_split("market1501", "train", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="synthetic_reid"):
    load_split("synthetic_reid", "train", data_dir=str(tmp_path), config=_config("domain_a"),
               build_if_missing=False)


def test_builder_configs_cover_domains():
  names = [c.name for c in builder_lib.Builder.BUILDER_CONFIGS]
  assert {"domain_a", "domain_b"} <= set(names) and set(names) == set(synthetic.DOMAINS)
