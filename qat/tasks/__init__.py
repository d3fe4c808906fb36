"""LightningModules for the recipes: image classification, causal language modelling, sentence-embedding distillation."""

from qat.tasks.classification import ImageClassifier
from qat.tasks.distillation import SentenceEmbeddingDistillation
from qat.tasks.language_model import CausalLanguageModel

__all__ = ["CausalLanguageModel", "ImageClassifier", "SentenceEmbeddingDistillation"]
