"""PAT (Ni et al., "Part-Aware Transformer for Generalizable Person Re-identification", CVPR 2023):
a ViT with three part tokens under a part-aware attention mask, trained with ID + soft-margin
triplet losses, contrastive part learning against a per-part memory bank (CSL) and part-guided
soft labels (PSD); ranked by cosine of the class token. docs/methods/pat.md."""
from jaxreid import backbones, models
from jaxreid.methods import Method
from jaxreid.methods.pat import convert, model, objective


def build(config) -> model.PATModel:
  m = config.model
  if m.get("backbone") != "vit":
    raise ValueError(f"PAT runs on a ViT: set model.backbone='vit' (got {m.get('backbone')!r}).")
  if int(m.get("part_tokens", 0)) != model.NUM_PARTS:
    raise ValueError(f"PAT has {model.NUM_PARTS} part tokens: set model.part_tokens="
                     f"{model.NUM_PARTS}.")
  d = config.data
  size = (int(m.get("input_height", d.height)), int(m.get("input_width", d.width)))
  if size != (d.height, d.width):
    raise ValueError(f"model.input_height × input_width = {size[0]}×{size[1]} must equal "
                     f"data.height × width = {d.height}×{d.width} (the position grid's input).")
  vit = backbones.get(m).build(m, models.compute_dtype(config))
  encoder = model.PATEncoder(vit, m.get("input_norm", "half"),
                             bool(m.get("random_test_masks", False)),
                             int(m.get("test_mask_seed", 0)))
  return model.PATModel(encoder=encoder, head=models.EmbeddingHead(None, 0, int(m.get("num_classes", 0))))


METHOD = Method(name="pat", kind="embedding", build=build, objectives={"pat": objective.PAT},
                convert=convert.convert, detect=convert.detect, export=convert.export,
                input_size=(256, 128),
                describe=lambda m: f"ViT {m.get('vit_dim')}×{m.get('vit_depth')}, "
                                   f"stride {m.get('stride_size')}")
