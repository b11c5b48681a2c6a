"""Finding target layers in KerasHub models, splicing adapters into them, and undoing it."""

from keras_biasinject.rewrite.adapter_file import load_adapter, save_adapter
from keras_biasinject.rewrite.config import PRESETS, InjectionConfig
from keras_biasinject.rewrite.control_vector import ControlVector, export_control_vector, load_control_vector, read_control_vector
from keras_biasinject.rewrite.feedback import add_feedback_head, remove_feedback_head
from keras_biasinject.rewrite.from_examples import control_from_examples
from keras_biasinject.rewrite.inject import InjectionReport, inject
from keras_biasinject.rewrite.merge import merge, remove
from keras_biasinject.rewrite.peft_adapter import export_peft, load_peft_adapter

__all__ = [
    "PRESETS", "InjectionConfig", "add_feedback_head", "remove_feedback_head", "InjectionReport", "control_from_examples", "inject", "load_adapter", "merge", "remove", "save_adapter",
    "ControlVector", "export_control_vector", "load_control_vector", "read_control_vector", "export_peft", "load_peft_adapter",
]
