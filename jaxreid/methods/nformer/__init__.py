"""NFormer (CVPR 2022): the embedding baseline as stage 1, the NFormer head trained on its cached
train features as stage 2, query + gallery refined as one set at test time.
docs/methods/nformer.md.

Its configs keep `model.name = "embedding"` (stage 1 is an embedding run, loadable as one) and
select this pipeline with `method = "nformer"`; the registry builds its entry on the embedding
method's (`method(stage1)`), which builds, trains and loads stage 1.
"""
import functools

from jaxreid.methods import Method
from jaxreid.methods.nformer import convert, refine


def _train(stage1, config, workdir, mesh=None):
  from jaxreid.methods.nformer import pipeline   # the training stack only when training
  return pipeline.train_and_evaluate(config, workdir, stage1, mesh)


def _evaluate(stage1, config, checkpoint, workdir=None, mesh=None):
  from jaxreid.methods.nformer import pipeline
  return pipeline.evaluate(config, checkpoint, stage1, workdir, mesh)


def _refiner(config, checkpoint):
  from jaxreid.methods.nformer import pipeline
  return pipeline.checkpoint_refiner(config, checkpoint)


def method(stage1: Method) -> Method:
  """NFormer's entry on `stage1`, the method of its image model (its model and objectives are
  stage 1's), with the hooks of the two-stage pipeline."""
  return Method(name="nformer", kind=stage1.kind, build=stage1.build,
                objectives=stage1.objectives, detect=convert.detect,
                train=functools.partial(_train, stage1),
                evaluate=functools.partial(_evaluate, stage1),
                load=functools.partial(refine.load_nformer, build_stage1=stage1.build),
                refiner=_refiner)
