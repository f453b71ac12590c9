"""NFormer's stage 1: the embedding baseline with GAP (the paper's "Res50"), as the training
loop sees it; `NFormer.METHOD` adds the stage-2 pipeline hooks."""
from jaxreid import models, objectives
from jaxreid.methods import Method


def build_stage1(config) -> models.EmbeddingModel:
  """The stage-1 model: the shared encoder (no neck) → GAP → Linear(embed_dim) → BNNeck →
  classifier, the same variables as the embedding method's "gap" model."""
  m = config.model
  head = models.EmbeddingHead(models.GlobalAveragePooling(), m.embed_dim, m.get("num_classes", 0))
  encoder = models.FeatureMapEncoder(**models.encoder_fields(config), normalize=False)
  return models.EmbeddingModel(encoder=encoder, head=head)


# Stage 1 as the training loop sees it (NFormer's registry entry adds the pipeline hooks).
STAGE1 = Method(name="nformer", kind="embedding", build=build_stage1,
                objectives={"embedding": objectives.EMBEDDING})
