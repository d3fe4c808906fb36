"""LightningModules for the recipes: image classification, causal language modelling, sentence-embedding distillation."""

from qat.app.tasks.classification import ImageClassifier
from qat.app.tasks.distillation import SentenceEmbeddingDistillation
from qat.app.tasks.language_model import CausalLanguageModel

__all__ = ["CausalLanguageModel", "ImageClassifier", "SentenceEmbeddingDistillation"]
