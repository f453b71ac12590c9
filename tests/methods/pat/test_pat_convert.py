"""Every file the official PAT trainer leaves loads through `jaxreid.load("pat", file)` and gives
the torch model's eval feature: per-epoch files (`model.state_dict()` of the training model, a
classifier row per training id; 'module.'-prefixed under distributed training) and the final
file (the state dict of the evaluation model built with no classes: 'classifier.weight' of shape
(0, D)). Variant and overlapping stride are read from the shapes. Evaluation features are float32
also when the config trains in bfloat16, closer to the float32 torch feature than bfloat16 allows.
`main.py --mode=eval --checkpoint FILE` evaluates the final file."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import jaxreid
from jaxreid.api import ReidModel
from torch_vit import ViT, official_eval_mask

H, W, PATCH, STRIDE, DIM, DEPTH, HEADS = 256, 128, 16, 14, 192, 2, 3   # DeiT-T blocks
GH, GW = (H - PATCH) // STRIDE + 1, (W - PATCH) // STRIDE + 1           # 18 × 9
IDS = 7


@pytest.fixture(scope="module")
def official():
  """The torch model's state dict as the training model holds it, sample images and the torch
  eval feature (the L2-normalised class token under the full-band mask)."""
  torch.manual_seed(0)
  base = ViT(DIM, DEPTH, HEADS, patch=PATCH, stride=STRIDE, grid=(GH, GW), parts=3,
             attn_name="part_attn").eval()
  state = {f"base.{k}": v for k, v in base.state_dict().items()}
  state["base.fc.weight"], state["base.fc.bias"] = torch.zeros(1000, DIM), torch.zeros(1000)
  bn = torch.nn.BatchNorm1d(DIM)
  with torch.no_grad():
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.bias.zero_()
  state.update({f"bottleneck.{k}": v for k, v in bn.state_dict().items()})
  state["classifier.weight"] = torch.randn(IDS, DIM) * 0.01
  images = np.random.default_rng(0).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
  x = torch.from_numpy(images).float().div(255).sub(0.5).div(0.5).permute(0, 3, 1, 2)
  with torch.no_grad():
    feature = torch.nn.functional.normalize(base(x, official_eval_mask(GH, GW))[:, 0], dim=1)
    unmasked = torch.nn.functional.normalize(base(x)[:, 0], dim=1)
    half = base.to(torch.bfloat16)(x.bfloat16(), official_eval_mask(GH, GW).bfloat16())[:, 0]
  return dict(state=state, images=images, feature=feature.numpy(), unmasked=unmasked.numpy(),
              bf16=torch.nn.functional.normalize(half.float(), dim=1).numpy())


def written(official, layout):
  """The state dict as the official trainer saves it in `layout`."""
  state = dict(official["state"])
  if layout == "final":         # the evaluation model: make_model(num_class=0)
    state["classifier.weight"] = torch.zeros(0, DIM)
  elif layout == "distributed":  # a per-epoch file of a DistributedDataParallel model
    state = {f"module.{k}": v for k, v in state.items()}
  return state


@pytest.mark.parametrize("layout,classes", [("per_epoch", IDS), ("distributed", IDS),
                                            ("final", 0)])
def test_official_files_give_the_torch_eval_feature(official, tmp_path, layout, classes):
  path = tmp_path / "part_attention_vit_60.pth"
  torch.save(written(official, layout), path)
  model = jaxreid.load("pat", path, input_size=(H, W))
  m = model.config.model
  assert (m.vit_dim, m.vit_depth, m.vit_heads, m.stride_size, m.num_classes) == (
      DIM, DEPTH, HEADS, STRIDE, classes)
  assert ("classifier" in model.variables["params"]["head"]) == (classes > 0)
  got = model.encode(official["images"])
  np.testing.assert_allclose(got, official["feature"], rtol=1e-4, atol=1e-4)
  # the mask matters: without it the feature is another one
  assert np.abs(official["unmasked"] - official["feature"]).max() > 1e-3


def test_eval_features_are_float32_when_training_in_bfloat16(official, tmp_path):
  path = tmp_path / "part_attention_vit_60.pth"
  torch.save(written(official, "final"), path)
  loaded = jaxreid.load("pat", path, input_size=(H, W))
  config = loaded.config.copy_and_resolve_references()
  config.train.bf16 = True
  model = ReidModel(config, loaded.variables)
  got = model.encode(official["images"])
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, official["feature"], rtol=1e-4, atol=1e-4)
  # bfloat16 computation misses the float32 feature by more than that tolerance
  assert np.abs(official["bf16"] - official["feature"]).max() > 1e-3


def test_cli_evaluates_the_final_file(official, synthetic_data_dir, tmp_path):
  path = tmp_path / "part_attention_vit_60.pth"
  torch.save(written(official, "final"), path)
  root = Path(__file__).resolve().parents[3]
  out = subprocess.run(
      [sys.executable, str(root / "main.py"), "--config", "configs/pat.py", "--mode=eval",
       f"--checkpoint={path}", f"--workdir={tmp_path / 'work'}",
       "--compilation_cache=~/.cache/jaxreid/xla-tests",
       f"--config.dataset.data_dir={synthetic_data_dir}", "--config.data.num_threads=1"],
      cwd=root, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "work" / "results.json").read_text())
  assert results["checkpoint"] == str(path)
  scores = results["test"]["synthetic_reid/domain_a"]
  assert scores["num_queries"] > 0 and 0.0 <= scores["mAP"] <= 100.0
