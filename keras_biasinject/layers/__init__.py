"""The three layers. This package imports nothing else of keras_biasinject."""

from keras_biasinject.layers.bias_inject_dense import BiasInjectDense
from keras_biasinject.layers.control import control_scope, current_control
from keras_biasinject.layers.decay_feedback import DecayFeedback
from keras_biasinject.layers.lora_bias_adapter import LoRABiasAdapter

__all__ = ["BiasInjectDense", "DecayFeedback", "LoRABiasAdapter", "control_scope", "current_control"]
