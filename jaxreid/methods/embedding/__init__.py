"""The embedding baseline (ResNet → pooling → Linear → BNNeck → classifier, reid-strong-baseline;
NFormer's stage 1) and the TransMatcher paper's ViT-style and vanilla-Transformer baselines as
its Transformer poolings. Vectors ranked by cosine. docs/methods/embedding.md."""
from jaxreid import models, objectives, official
from jaxreid.methods import Method
from jaxreid.methods.embedding import convert, model

POOLINGS = ("gap", "vit", "decoder")


def build(config) -> models.EmbeddingModel:
  m = config.model
  kind = m.get("pooling", "gap")
  if kind not in POOLINGS:
    raise ValueError(f"model.pooling={kind!r} is unknown; use one of {POOLINGS}.")
  if kind != "gap" and not m.neck:
    raise ValueError(f"model.pooling={kind!r} needs a neck (model.neck = d > 0).")
  fields = models.encoder_fields(config)
  if kind == "gap":
    pooling = models.GlobalAveragePooling()
  else:
    layers = dict(num_layers=m.num_layers, heads=m.heads, ffn=m.ffn, pos_embed=m.pos_embed,
                  dtype=fields["dtype"])
    pooling = (model.ClassTokenEncoder(**layers) if kind == "vit" else
               model.LearnedQueryDecoder(**layers, num_queries=m.num_queries))
  head = models.EmbeddingHead(pooling, m.embed_dim, m.get("num_classes", 0))
  encoder = models.FeatureMapEncoder(**fields, normalize=m.get("normalize", False))
  return models.EmbeddingModel(encoder=encoder, head=head)


METHOD = Method(name="embedding", kind="embedding", build=build,
                objectives={"embedding": objectives.EMBEDDING},
                convert=official.baseline_from_official, detect=convert.detect,
                export=official.baseline_to_official,
                input_size=(256, 128),
                describe=lambda m: f"pooling {m.get('pooling', 'gap')}")
