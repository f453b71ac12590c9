"""Global poolings of the embedding models against NumPy forwards: ViT class token encoder and
the vanilla Transformer's learned-query decoder (TransMatcher paper Table 2), and their configs
build, train one step and keep the TransMatcher budget."""
import jax
import numpy as np

from configs import transmatcher, vanilla_transformer, vit
from jaxreid.methods.embedding import model as poolings
from numpy_transformer import (D_MODEL, FFN, H, HEADS, N, W, decoder_layer, encoder_layer, f64,
                               rand, randomized)


def init(module, seed=0):
  v = module.init(jax.random.key(0), np.zeros((2, H, W, D_MODEL), np.float32))
  return randomized(v, seed)


def test_class_token_encoder_equals_numpy():
  module = poolings.ClassTokenEncoder(num_layers=N, heads=HEADS, ffn=FFN)
  v = init(module)
  maps = rand((3, H, W, D_MODEL), 1)
  got = np.asarray(jax.jit(module.apply)(v, maps))
  p = f64(v["params"])
  for b in range(3):
    x = np.concatenate([p["cls"][0], maps[b].reshape(H * W, D_MODEL) + p["pos_embed"]])
    for n in range(N):
      x = encoder_layer(x, p[f"layers_{n}"])
    np.testing.assert_allclose(got[b], x[0], rtol=1e-4, atol=1e-4)


def test_learned_query_decoder_equals_numpy():
  module = poolings.LearnedQueryDecoder(num_layers=N, heads=HEADS, ffn=FFN, num_queries=3)
  v = init(module, seed=1)
  maps = rand((3, H, W, D_MODEL), 2)
  got = np.asarray(jax.jit(module.apply)(v, maps))
  p = f64(v["params"])
  for b in range(3):
    memory = maps[b].reshape(H * W, D_MODEL) + p["pos_embed"]
    for n in range(N):
      memory = encoder_layer(memory, p[f"encoder_{n}"])
    x = p["queries"][0]
    for n in range(N):
      x = decoder_layer(x, memory, p[f"decoder_{n}"])
    np.testing.assert_allclose(got[b], x.mean(0), rtol=1e-4, atol=1e-4)


def test_without_positional_embedding_the_class_token_ignores_token_order():
  module = poolings.ClassTokenEncoder(num_layers=N, heads=HEADS, ffn=FFN, pos_embed=False)
  v = init(module)
  maps = rand((2, H, W, D_MODEL), 3)
  shuffled = maps.reshape(2, H * W, D_MODEL)[:, ::-1].reshape(maps.shape)
  a, b = module.apply(v, maps), module.apply(v, shuffled)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_comparison_configs_share_the_transmatcher_budget():
  base = transmatcher.get_config()
  for module, pooling in ((vit, "vit"), (vanilla_transformer, "decoder")):
    c = module.get_config()
    assert (c.model.name, c.model.pooling, c.train.loss) == ("embedding", pooling, "embedding")
    for field in ("neck", "ffn", "num_layers", "heads", "depth", "width"):
      assert c.model[field] == base.model[field], field
    for field in ("epochs", "lr", "lr_step_epochs", "clip_norm", "optimizer"):
      assert c.train.get(field) == base.train.get(field), field
    assert (c.data.sampler, c.data.batch_size) == (base.data.sampler, base.data.batch_size)
    table2 = module.get_config("table2")
    assert (table2.model.neck, table2.model.ffn, table2.model.num_layers) == (512, 2048, 3)
    assert set(table2.eval.paper) == {"cuhk03_np/detected", "market1501"}
