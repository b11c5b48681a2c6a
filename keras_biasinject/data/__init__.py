"""Data: real text data sets built offline from Debian packages, and `tf.data` pipelines with controls."""

from keras_biasinject.data.builders import JaneAusten, SmallFineFoods, load_dataset, prepared_builder
from keras_biasinject.data.chat import chat_template_of, render_chat, render_pair
from keras_biasinject.data.completion import model_texts, response_spans, tokenized_pairs
from keras_biasinject.data.debian import extracted_package
from keras_biasinject.data.pipeline import DataConfig, make_dataset, read_examples
from keras_biasinject.data.r_lazyload import lazyload_names, read_lazyload

__all__ = [
    "DataConfig",
    "JaneAusten",
    "SmallFineFoods",
    "chat_template_of",
    "extracted_package",
    "lazyload_names",
    "load_dataset",
    "make_dataset",
    "model_texts",
    "prepared_builder",
    "read_examples",
    "read_lazyload",
    "render_chat",
    "render_pair",
    "response_spans",
    "tokenized_pairs",
]
