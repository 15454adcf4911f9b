"""Train stage: contrastive fine-tuning of an Encoder (loss, GradCache, recipes, trainer, CLI)."""
