"""PAT (Ni et al., "Part-Aware Transformer for Generalizable Person Re-identification", CVPR 2023):
a ViT with three part tokens under a part-aware attention mask, trained with ID + soft-margin
triplet losses, contrastive part learning against a per-part memory bank (CSL) and part-guided
soft labels (PSD); ranked by cosine of the class token. docs/methods/pat.md."""
from jaxreid.methods import Method
from jaxreid.methods.pat import convert, objective
from jaxreid.methods.pat.model import build


def _prepare(config, state, split, mesh, log):
  """With train.pat.prefill, a fresh run starts from the official pre-filled part memory."""
  if not config.train.pat.get("prefill", False):
    return state
  from jaxreid.methods.pat import prefill   # the data pipeline only when training
  return prefill.prepare(config, state, split, mesh, log)


METHOD = Method(name="pat", kind="embedding", build=build,
                objectives={"pat": objective.PAT._replace(prepare=_prepare)},
                convert=convert.convert, detect=convert.detect, export=convert.export,
                input_size=(256, 128),
                describe=lambda m: f"{m.get('part_tokens', 0)} part tokens")
