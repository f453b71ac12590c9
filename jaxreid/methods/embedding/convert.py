"""Which official checkpoints are the embedding model's: reid-strong-baseline's `Baseline`
(NFormer's stage 1), bare or as the 'backbone.*' half of NFormer's release file
`nformer_model.pth` (docs/methods/embedding.md). The conversion itself is shared
(`official.baseline_from_official` / `baseline_to_official`)."""
from jaxreid.methods import has_key


def detect(keys) -> bool:
  """A `Baseline`: 'base.layer*' ResNet with 'projection' and 'bottleneck' beside it (alone or
  under 'backbone.', as in NFormer's release file)."""
  return (has_key(keys, "base.layer") and has_key(keys, "projection.")
          and has_key(keys, "bottleneck."))
