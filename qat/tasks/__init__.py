"""LightningModules for the recipes: image classification (language modelling and distillation follow)."""

from qat.tasks.classification import ImageClassifier

__all__ = ["ImageClassifier"]
