"""The adapter kinds: the one table that `InjectionConfig.kind`, `inject` and sharding read.

Adding a kind is adding a `ControlAdapter` subclass and one entry here.
"""

from keras_biasinject.layers.bias_inject_dense import BiasInjectDense
from keras_biasinject.layers.lora_bias_adapter import LoRABiasAdapter

ADAPTER_KINDS = {cls.kind: cls for cls in (LoRABiasAdapter, BiasInjectDense)}  # kind name -> adapter class


def adapter_weight(path):
    """`(adapter class, weight name, kernel path)` when `path` is an adapter weight's variable path,
    else None: `block/attention/query_lora_bias/lora_a` -> `(LoRABiasAdapter, "lora_a",
    "block/attention/query/kernel")`, the kernel that weight adapts."""
    scope, _, weight = path.rpartition("/")
    parent, _, name = scope.rpartition("/")
    for cls in ADAPTER_KINDS.values():
        base_name = name.removesuffix(cls.name_suffix)
        if weight in cls.weight_names and base_name and base_name != name:
            kernel = f"{base_name}/kernel" if not parent else f"{parent}/{base_name}/kernel"
            return cls, weight, kernel
    return None
