"""TFDS builder of `synthetic_reid`: `jaxreid.data.synthetic` rendered into train/query/gallery.

Needs no download and no TensorFlow when prepared with
`Builder(config=..., data_dir=...).download_and_prepare(file_format="array_record")`.
"""
import dataclasses
import io
import pathlib
import sys

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

try:
  from jaxreid.data import synthetic
except ImportError:  # `tfds build tfds_builders/synthetic_reid` does not put the repo root on sys.path
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  from jaxreid.data import synthetic


@dataclasses.dataclass
class SyntheticReidConfig(tfds.core.BuilderConfig):
  """One domain of the synthetic data at one size; the fields are `synthetic.generate`'s."""
  domain: str = "domain_a"
  num_train_ids: int = 150
  num_test_ids: int = 100
  num_cameras: int = 6
  num_distractors: int = 40
  seed: int = 0

  def generate_kwargs(self) -> dict:
    return dict(num_train_ids=self.num_train_ids, num_test_ids=self.num_test_ids,
                num_cameras=self.num_cameras, num_distractors=self.num_distractors,
                seed=self.seed)


class Builder(tfds.core.GeneratorBasedBuilder):
  """Person re-identification images drawn procedurally, one builder config per domain."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      SyntheticReidConfig(name=name, domain=name, description=f"Synthetic people, {name}.")
      for name in synthetic.DOMAINS
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(synthetic.HEIGHT, synthetic.WIDTH, 3)),
            "pid": np.int32,
            "camera": np.int32,
            "time": np.float32,
            "filename": tfds.features.Text(),
        }),
        supervised_keys=("image", "pid"),
        disable_shuffling=True,  # keep generation order (sorted by file name, like Market's lists)
        homepage="https://github.com/",
        description="Procedural person re-id images; cameras differ in style, ids walk in groups.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in ("train", "query", "gallery")}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    for i, ex in enumerate(synthetic.generate(cfg.domain, split, **cfg.generate_kwargs())):
      yield i, dict(ex, image=_png(ex["image"]))


def _png(image: np.ndarray) -> bytes:
  """PNG bytes by Pillow (TFDS would need TensorFlow to encode an array); fast, low compression."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="png", compress_level=1)
  return buffer.getvalue()
