"""The layers: the adapter kinds and their shared interface, the feedback layer, and the control
routing. This package imports nothing else of keras_biasinject."""

from keras_biasinject.layers.adapter import ControlAdapter
from keras_biasinject.layers.bias_inject_dense import BiasInjectDense
from keras_biasinject.layers.control import control_scope, current_control
from keras_biasinject.layers.decay_feedback import DecayFeedback
from keras_biasinject.layers.feedback_head import FeedbackHead
from keras_biasinject.layers.kinds import ADAPTER_KINDS, adapter_weight
from keras_biasinject.layers.lora_bias_adapter import LoRABiasAdapter

__all__ = [
    "ADAPTER_KINDS", "BiasInjectDense", "ControlAdapter", "DecayFeedback", "FeedbackHead", "LoRABiasAdapter", "adapter_weight",
    "control_scope", "current_control",
]
