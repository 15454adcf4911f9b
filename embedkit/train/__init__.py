"""Train stage: recipes (config), the training engine (engine, backends), losses, the contrastive step
(contrastive, gradcache, remining) and the CLI. `embedkit.train.train(recipe)` runs a contrastive recipe."""


def train(*args, **kwargs):
    from embedkit.train.contrastive import train as _train

    return _train(*args, **kwargs)
