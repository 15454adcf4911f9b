"""Train stage: recipes (config), the training engine (engine, backends), losses, the contrastive step
(contrastive, gradcache, remining), the reranker step (rerank) and the CLI. `embedkit.train.train(recipe)` trains
the recipe's model, whatever its task."""


def train(recipe, *args, **kwargs):
    """`recipe`'s model through the engine: the bi-encoder (contrastive.train), or for `task: rerank` the reranker
    (rerank.train_reranker). Looked up at each call, so a test's stand-in for either is the one that runs."""
    if getattr(recipe, "task", "embed") == "rerank":
        from embedkit.train.rerank import train_reranker as _train
    else:
        from embedkit.train.contrastive import train as _train

    return _train(recipe, *args, **kwargs)
