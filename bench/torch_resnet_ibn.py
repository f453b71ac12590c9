"""An independent PyTorch ResNet (torchvision layout and key names, IBN-Net's IBN-b): the
reference of the conversion tests and the network of the PyTorch training-step baseline."""
import torch.nn.functional as F
from torch import nn


TORCH_DEPTHS = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3))}  # bottleneck?, blocks


class TorchBlock(nn.Module):
  """torchvision BasicBlock / Bottleneck (stride on the 3×3), IBN-b `IN` after the add."""

  def __init__(self, bottleneck, inplanes, planes, stride, instance_norm):
    super().__init__()
    self.bottleneck = bottleneck
    out = planes * 4 if bottleneck else planes
    if bottleneck:
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(out)
    else:
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn1, self.bn2 = nn.BatchNorm2d(planes), nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != out:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                      nn.BatchNorm2d(out))
    self.IN = nn.InstanceNorm2d(out, affine=True) if instance_norm else None

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    if self.bottleneck:
      y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
    else:
      y = self.bn2(self.conv2(y))
    y = y + (x if self.downsample is None else self.downsample(x))
    if self.IN is not None:
      y = self.IN(y)
    return F.relu(y)


class TorchResNet(nn.Module):
  """torchvision ResNet; IBN-b: InstanceNorm stem `bn1`, `IN` in the last block of layer1/2.
  Built up to `final_layer` (the ImageNet classifier `fc` only with all four stages)."""

  def __init__(self, depth, ibn, width, final_layer="layer4"):
    super().__init__()
    bottleneck, counts = TORCH_DEPTHS[depth]
    counts = counts[:int(final_layer[-1])]
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.InstanceNorm2d(width, affine=True) if ibn else nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for i, n in enumerate(counts):
      planes, blocks = width * 2**i, []
      for j in range(n):
        stride = (1 if i == 0 else 2) if j == 0 else 1
        instance_norm = ibn and i < 2 and j == n - 1
        blocks.append(TorchBlock(bottleneck, inplanes, planes, stride, instance_norm))
        inplanes = planes * (4 if bottleneck else 1)
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.num_features = inplanes
    if len(counts) == 4:
      self.fc = nn.Linear(inplanes, 10)  # the ImageNet classifier: ignored by the converter

  def forward(self, x, final_layer="layer3"):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    for i in range(1, int(final_layer[-1]) + 1):
      x = getattr(self, f"layer{i}")(x)
    return x
