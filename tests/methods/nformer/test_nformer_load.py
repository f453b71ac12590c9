"""`jaxreid.load("nformer", …)`: an official-layout state dict written by a small torch NFormer
(dense LAA + RNS from the paper) loads and refines like the torch forward."""
import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxreid  # noqa: E402
from jaxreid.nn.norms import l2_normalize  # noqa: E402
from jaxreid.methods.nformer.model import sample_landmarks  # noqa: E402

DIM, HEADS, FFN, LAYERS, CLASSES = 32, 2, 48, 2, 7


class Conv1D(torch.nn.Module):
  """The official Conv1D: weight `w` [in, out], bias `b`."""

  def __init__(self, n_in, n_out):
    super().__init__()
    self.w = torch.nn.Parameter(0.2 * torch.randn(n_in, n_out))
    self.b = torch.nn.Parameter(0.1 * torch.randn(n_out))

  def forward(self, x):
    return x @ self.w + self.b


class LayerNorm(torch.nn.Module):
  def __init__(self, n):
    super().__init__()
    self.g = torch.nn.Parameter(1 + 0.1 * torch.randn(n))
    self.b = torch.nn.Parameter(0.1 * torch.randn(n))

  def forward(self, x):
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return self.g * (x - u) / torch.sqrt(s + 1e-5) + self.b


class Attn(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.c_attn, self.c_proj = Conv1D(DIM, 3 * DIM), Conv1D(DIM, DIM)


class MLP(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.c_fc, self.c_proj = Conv1D(DIM, FFN), Conv1D(FFN, DIM)


class Block(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.attn, self.ln_1, self.mlp, self.ln_2 = Attn(), LayerNorm(DIM), MLP(), LayerNorm(DIM)

  def forward(self, x, mask, landmarks):
    """Paper: A = (Q·K_Lᵀ)(Q_L·Kᵀ)/√d_head, softmax over the reciprocal-neighbour mask."""
    n, dh = x.shape[0], DIM // HEADS
    q, k, v = self.attn.c_attn(x).split(DIM, dim=1)
    out = []
    for h in range(HEADS):
      qh, kh, vh = (t[:, h * dh:(h + 1) * dh] for t in (q, k, v))
      a = (qh @ kh[landmarks].T) @ (qh[landmarks] @ kh.T) / math.sqrt(dh)
      out.append(torch.softmax(a.masked_fill(~mask, float("-inf")), dim=1) @ vh)
    n1 = self.ln_1(x + self.attn.c_proj(torch.cat(out, 1)))
    gelu = lambda y: 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    return self.ln_2(n1 + self.mlp.c_proj(gelu(self.mlp.c_fc(n1))))


class TorchNFormer(torch.nn.Module):
  """Official key layout: h.{i}.…, bottleneck (BatchNorm1d, zero bias), classifier."""

  def __init__(self):
    super().__init__()
    self.h = torch.nn.ModuleList([Block() for _ in range(LAYERS)])
    self.bottleneck = torch.nn.BatchNorm1d(DIM)
    self.bottleneck.bias.requires_grad_(False)
    self.classifier = torch.nn.Linear(DIM, CLASSES, bias=False)
    with torch.no_grad():
      self.bottleneck.weight.uniform_(0.5, 1.5)
      self.bottleneck.running_mean.normal_(0, 0.3)
      self.bottleneck.running_var.uniform_(0.5, 2.0)

  def forward(self, x, landmarks, k, num_queries=0):
    """landmarks [LAYERS, l]: block i attends through landmarks[i]."""
    n = x.shape[0]
    xn = x / x.norm(dim=1, keepdim=True)
    sims = xn @ xn.T
    sims.fill_diagonal_(float("inf"))
    top = sims.topk(k, dim=1).indices
    member = torch.zeros(n, n, dtype=torch.bool)
    member[torch.arange(n)[:, None], top] = True
    mask = member & member.T
    q = torch.arange(n) < num_queries
    mask &= ~(q[:, None] & q[None, :] & ~torch.eye(n, dtype=torch.bool))
    for block, lm in zip(self.h, landmarks):
      x = block(x, mask, lm)
    return self.bottleneck(x)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  torch.manual_seed(0)
  model = TorchNFormer().double().eval()
  path = tmp_path_factory.mktemp("nformer") / "nformer_model.pth"
  torch.save(model.state_dict(), path)
  return model, path


def reference(model, x, landmarks, k, num_queries=0):
  with torch.no_grad():
    return model(torch.from_numpy(np.array(x, np.float64)), torch.as_tensor(landmarks), k,
                 num_queries).numpy()


def test_official_state_dict_refines_like_torch(official):
  model, path = official
  loaded = jaxreid.load("nformer", path)
  m = loaded.module
  assert (m.layers, m.dim, m.ffn, m.heads) == (LAYERS, DIM, FFN, HEADS)
  assert loaded.variables["params"]["h_0"]["attn"]["c_attn"]["kernel"].shape == (DIM, 3 * DIM)
  x = np.random.default_rng(0).standard_normal((90, DIM)).astype(np.float32)
  landmarks = np.stack([sample_landmarks(jax.random.fold_in(jax.random.key(0), i), 90, 5)
                        for i in range(LAYERS)])          # refine's fixed key, one draw per block
  unit = np.asarray(l2_normalize(x))
  outputs = []
  for nq in (0, 25):
    want = reference(model, unit, landmarks, 20, nq)
    outputs.append(loaded.refine(x, num_queries=nq or None))
    np.testing.assert_allclose(outputs[-1], want, atol=2e-4, rtol=1e-4)
  assert np.abs(outputs[0][:25] - outputs[1][:25]).max() > 1e-2   # the query mask matters
  np.testing.assert_array_equal(loaded.refine(x), loaded.refine(x))


def test_prefixed_state_dict_and_bad_bias(official, tmp_path):
  model, _ = official
  state = {f"nformer.{k}": v for k, v in model.state_dict().items()}
  torch.save(state, tmp_path / "full.pth")
  assert jaxreid.load("nformer", tmp_path / "full.pth").module.layers == LAYERS
  state = dict(model.state_dict())
  state["bottleneck.bias"] = state["bottleneck.bias"] + 1
  torch.save(state, tmp_path / "bias.pth")
  with pytest.raises(ValueError, match="frozen at zero"):
    jaxreid.load("nformer", tmp_path / "bias.pth")
  torch.save({"layer.weight": torch.zeros(2)}, tmp_path / "other.pth")
  with pytest.raises(ValueError, match="not an NFormer"):
    jaxreid.load("nformer", tmp_path / "other.pth")
