"""Data: real text data sets built offline from Debian packages, and `tf.data` pipelines with controls."""

from keras_biasinject.data.builders import JaneAusten, SmallFineFoods, load_dataset, prepared_builder
from keras_biasinject.data.debian import extracted_package
from keras_biasinject.data.pipeline import DataConfig, make_dataset, read_examples
from keras_biasinject.data.r_lazyload import lazyload_names, read_lazyload

__all__ = [
    "DataConfig",
    "JaneAusten",
    "SmallFineFoods",
    "extracted_package",
    "lazyload_names",
    "load_dataset",
    "make_dataset",
    "prepared_builder",
    "read_examples",
    "read_lazyload",
]
