"""Recipes: declarative fine-tuning runs that compare bias injection with its control groups."""

from keras_biasinject.recipes.config import METHODS, ModelConfig, Recipe, TrainConfig, load_recipe
from keras_biasinject.recipes.finetune import finetune

__all__ = ["METHODS", "ModelConfig", "Recipe", "TrainConfig", "finetune", "load_recipe"]
