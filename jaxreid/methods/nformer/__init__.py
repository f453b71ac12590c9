"""NFormer (CVPR 2022): the embedding baseline as stage 1, the NFormer head trained on its cached
train features as stage 2, query + gallery refined as one set at test time.
docs/methods/nformer.md.

Its configs keep `model.name = "embedding"` (stage 1 is an embedding run, loadable as one) and
select this pipeline with `method = "nformer"`.
"""
import dataclasses

from jaxreid.methods.nformer import convert, refine
from jaxreid.methods.nformer.stage1 import STAGE1


def _train(config, workdir, mesh=None):
  from jaxreid.methods.nformer import pipeline   # the training stack only when training
  return pipeline.train_and_evaluate(config, workdir, mesh)


def _evaluate(config, checkpoint, workdir=None, mesh=None):
  from jaxreid.methods.nformer import pipeline
  return pipeline.evaluate(config, checkpoint, workdir, mesh)


def _refiner(config, checkpoint):
  from jaxreid.methods.nformer import pipeline
  return pipeline.checkpoint_refiner(config, checkpoint)


METHOD = dataclasses.replace(
    STAGE1, convert=None, detect=convert.detect, train=_train, evaluate=_evaluate,
    load=refine.load_nformer, refiner=_refiner,
    describe=lambda m: "pooling gap, NFormer stage 2")
