"""An official PAT checkpoint (the `build_part_attention_vit` state-dict layout: 'base.*' with
part tokens and 'part_attn', 'bottleneck.*', 'classifier.weight') of a small torch transcription
loads through `jaxreid.load("pat", file)`, with its variant and overlapping stride read from the
shapes, and `encode` gives the torch model's eval feature under full-band masks."""
import numpy as np
import torch

import jaxreid
from torch_vit import ViT, official_eval_mask

H, W, PATCH, STRIDE, DIM, DEPTH, HEADS = 256, 128, 16, 14, 192, 2, 3   # DeiT-T blocks
GH, GW = (H - PATCH) // STRIDE + 1, (W - PATCH) // STRIDE + 1           # 18 × 9


def test_official_checkpoint_gives_the_torch_eval_feature(tmp_path):
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
  state["classifier.weight"] = torch.randn(7, DIM) * 0.01
  path = tmp_path / "part_attention_vit_60.pth"
  torch.save(state, path)

  model = jaxreid.load("pat", path, input_size=(H, W))
  m = model.config.model
  assert (m.vit_dim, m.vit_depth, m.vit_heads, m.stride_size, m.num_classes) == (
      DIM, DEPTH, HEADS, STRIDE, 7)
  images = np.random.default_rng(0).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
  x = torch.from_numpy(images).float().div(255).sub(0.5).div(0.5).permute(0, 3, 1, 2)
  with torch.no_grad():
    cls = base(x, official_eval_mask(GH, GW))[:, 0]
  want = torch.nn.functional.normalize(cls, dim=1).numpy()
  np.testing.assert_allclose(model.encode(images), want, rtol=1e-4, atol=1e-4)
  with torch.no_grad():   # the mask matters: without it the feature is another one
    unmasked = torch.nn.functional.normalize(base(x)[:, 0], dim=1).numpy()
  assert np.abs(unmasked - want).max() > 1e-3
