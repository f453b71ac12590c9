"""A PyTorch transcription of the official QAConv-GS v2.1 training step (QAConv release v2.1:
`main.py`, `reid/trainers.py`, `reid/models/resmap.py`, `reid/models/qaconv.py`,
`reid/loss/triplet_loss.py`), written for `bench/device_suite.py`'s `train` section, where the
official code itself cannot run (it needs torchvision and torch.hub IBN-Net downloads).

What one `step` does, as the official trainer (docs/methods/qaconv.md):
  - feature model: ResNet / IBN-Net-b up to `final_layer`, 3×3 neck conv with bias (no BN), L2
    normalisation over channels; `model.eval()`, so the backbone BN uses running statistics;
  - criterion (`criterion.train()`): the QAConv matcher scores every batch pair (batch-statistics
    BN), then the batch-hard triplet on the scores, loss_i = max(0, m - (min_pos_i - max_neg_i))
    with m = 16 (hardest positive excluding the anchor itself, hardest negative); the batch loss
    is the mean over anchors with a finite loss (no finite anchor: the step is skipped);
  - float16 autocast + GradScaler when `amp` (CUDA); gradients unscaled, then `clip_grad_norm_`
    at 8 (the official `--clip_value` default) on the model's and the criterion's parameters
    separately; SGD, Nesterov momentum 0.9, weight decay 5e-4, lr 0.005 for the neck and the
    matcher and 0.1 × lr for the backbone.

Departures: random initialisation (PyTorch's default) instead of ImageNet weights; no
nn.DataParallel wrapper (one device); the images are given once and stay on the device (no data
loader), converted from uint8 to [0, 1] floats (the official transforms' ToTensor, no mean/std
normalisation) inside the step; the loss is read back every step (the official trainer calls
`loss.item()` too).
"""
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch_resnet_ibn import TorchResNet

MAP_STRIDE = {"layer2": 8, "layer3": 16, "layer4": 32}
CLIP_VALUE = 8.0      # official main.py --clip_value default
MARGIN = 16.0         # official main.py --margin default
LR = 0.005            # official main.py --lr default


class FeatureMap(nn.Module):
  """resmap v2.1: `base` (torch_resnet_ibn.TorchResNet up to `final_layer`) → 3×3 `neck_conv`
  with bias (if neck > 0) → L2 normalisation over channels (F.normalize)."""

  def __init__(self, depth=50, ibn="b", final_layer="layer3", neck=128, width=64):
    super().__init__()
    self.final_layer = final_layer
    self.base = TorchResNet(depth, ibn == "b", width, final_layer)
    out = self.base.num_features
    self.neck = neck
    if neck > 0:
      self.neck_conv = nn.Conv2d(out, neck, 3, padding=1)
      out = neck
    self.num_features = out

  def forward(self, x):
    x = self.base(x, self.final_layer)
    if self.neck > 0:
      x = self.neck_conv(x)
    return F.normalize(x)


class QAConv(nn.Module):
  """QAConv v2.1 matcher (ECCV 2020): all location correlations of each probe × gallery pair,
  max over gallery locations and over probe locations, scalar BN over all pooled values,
  Linear(hw → 1) shared by both directions, sum of the two, scalar BN on the logit."""

  def __init__(self, num_features, height, width):
    super().__init__()
    self.num_features, self.height, self.width = num_features, height, width
    hw = height * width
    self.bn = nn.BatchNorm1d(1)
    self.fc = nn.Linear(hw, 1)
    self.logit_bn = nn.BatchNorm1d(1)
    with torch.no_grad():
      self.fc.weight.fill_(1.0 / hw)

  def forward(self, prob_fea, gal_fea):
    hw = self.height * self.width
    p = prob_fea.reshape(len(prob_fea), self.num_features, hw)
    g = gal_fea.reshape(len(gal_fea), self.num_features, hw)
    score = torch.einsum("pcs,gcr->pgrs", p, g)
    score = torch.cat((score.max(dim=2)[0], score.max(dim=3)[0]), dim=-1)
    score = self.bn(score.reshape(-1, 1, hw)).reshape(-1, hw)
    score = self.fc(score).reshape(-1, 2).sum(dim=1, keepdim=True)
    return self.logit_bn(score).reshape(len(p), len(g))


class TripletLoss(nn.Module):
  """Batch-hard triplet on the QAConv scores of the batch against itself (GS paper, Liao & Shao
  2021). Returns per-anchor (loss, accuracy): loss = max(0, margin - (min_pos - max_neg))."""

  def __init__(self, matcher, margin=MARGIN):
    super().__init__()
    self.matcher = matcher
    self.ranking_loss = nn.MarginRankingLoss(margin=margin, reduction="none")

  def forward(self, feature, target):
    score = self.matcher(feature, feature)
    same = (target[:, None] == target[None, :]).float()
    eye = torch.eye(len(score), device=score.device)
    big = 1e15         # pushes excluded entries out of the min / max, as the official mining
    min_pos = torch.min(score * same + (1 - same + eye) * big, dim=1)[0]
    max_neg = torch.max(score * (1 - same) - same * big, dim=1)[0]
    loss = self.ranking_loss(min_pos, max_neg, torch.ones_like(min_pos))
    with torch.no_grad():
      acc = (min_pos >= max_neg).float()
    return loss, acc


class TrainStep:
  """The model, criterion, optimizer and scaler of one official training run; `step` runs one
  iteration of the official trainer's loop."""

  def __init__(self, depth=50, width=64, neck=128, height=384, width_px=128, ibn="b",
               final_layer="layer3", device="cpu", amp=False, lr=LR, margin=MARGIN,
               clip_value=CLIP_VALUE, seed=0):
    torch.manual_seed(seed)
    self.device = torch.device(device)
    self.amp = bool(amp) and self.device.type == "cuda"
    if self.device.type == "cuda":
      torch.backends.cudnn.benchmark = True      # official main.py
    self.model = FeatureMap(depth, ibn, final_layer, neck, width).to(self.device)
    hei, wid = height // MAP_STRIDE[final_layer], width_px // MAP_STRIDE[final_layer]
    self.matcher = QAConv(self.model.num_features, hei, wid).to(self.device)
    self.criterion = TripletLoss(self.matcher, margin).to(self.device)
    base_ids = set(map(id, self.model.base.parameters()))
    new_params = [p for p in self.model.parameters() if id(p) not in base_ids]
    self.optimizer = torch.optim.SGD(
        [{"params": self.model.base.parameters(), "lr": 0.1 * lr},
         {"params": new_params, "lr": lr},
         {"params": self.matcher.parameters(), "lr": lr}],
        lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    self.clip_value = clip_value
    self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

  def to_input(self, images):
    """uint8 NHWC (numpy or tensor) → float [0, 1] NCHW on the device; float NCHW passes."""
    x = torch.as_tensor(images).to(self.device, non_blocking=True)
    if x.dtype == torch.uint8:
      x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous()

  def step(self, images, labels):
    """One training iteration; returns the loss (nan when no anchor's loss is finite, and then,
    as the official trainer, no update)."""
    self.model.eval()               # frozen backbone BN statistics
    self.criterion.train()
    inputs = self.to_input(images)
    targets = torch.as_tensor(labels).to(self.device, torch.long)
    self.optimizer.zero_grad()
    with torch.enable_grad(), torch.autocast(self.device.type, dtype=torch.float16,
                                             enabled=self.amp):   # whatever the caller's mode
      loss, _ = self.criterion(self.model(inputs), targets)
      finite = loss.isfinite()
      if not finite.any():
        return float("nan")
      loss = loss[finite].mean()
    value = loss.item()
    self.scaler.scale(loss).backward()
    self.scaler.unscale_(self.optimizer)
    nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_value)
    nn.utils.clip_grad_norm_(self.criterion.parameters(), self.clip_value)
    self.scaler.step(self.optimizer)
    self.scaler.update()
    return value


def build(depth=50, width=64, neck=128, height=384, width_px=128, batch=64, device="cpu",
          amp=False, **kwargs):
  """The TrainStep of a setting; `batch` is accepted so the call names the whole setting, but no
  module depends on it."""
  del batch
  return TrainStep(depth=depth, width=width, neck=neck, height=height, width_px=width_px,
                   device=device, amp=amp, **kwargs)


def random_batch(batch, height, width_px, instances=2, seed=0):
  """(uint8 NHWC images, labels) of batch / instances classes × instances images."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, height, width_px, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(batch // instances), instances)
  return images, labels


def measure(depth=50, width=64, neck=128, height=384, width_px=128, batch=64, device="cuda",
            amp=True, steps=20, instances=2, seed=0, **kwargs):
  """Throughput of `steps` official steps on one fixed random batch (resident on the device),
  after one untimed first step (cuDNN autotuning, allocator warm-up), which is `first_s`."""
  trainer = build(depth, width, neck, height, width_px, batch, device, amp, seed=seed, **kwargs)
  images, labels = random_batch(batch, height, width_px, instances, seed)
  images = torch.as_tensor(images).to(trainer.device)
  labels = torch.as_tensor(labels).to(trainer.device)
  sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
  sync()
  t0 = time.perf_counter()
  trainer.step(images, labels)
  sync()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = trainer.step(images, labels)
  sync()
  wall = time.perf_counter() - t0
  return {"images_per_s": steps * batch / wall, "first_s": first, "wall_s": wall,
          "step_ms": 1000 * wall / steps, "loss": float(loss)}
