"""A training run: the loop, the recipe, checkpoints, the run itself, evaluation and distributed setup."""
