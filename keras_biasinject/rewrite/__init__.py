"""Finding target layers in KerasHub models and splicing adapters into them."""

from keras_biasinject.rewrite.config import PRESETS, InjectionConfig
from keras_biasinject.rewrite.inject import InjectionReport, inject

__all__ = ["PRESETS", "InjectionConfig", "InjectionReport", "inject"]
