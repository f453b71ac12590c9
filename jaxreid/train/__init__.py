"""The one training loop (`loop.run`) and what it needs: the train state, the optimiser and its
schedules, the generic train step that applies a method's `objectives.Objective`.

`loop.train_and_evaluate(config, workdir, method)` trains an image model; a method with more
stages builds its own `loop.Task` for each later one and runs it through the same `loop.run`.
"""
