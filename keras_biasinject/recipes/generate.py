"""Greedy generation from a causal LM, with a saved adapter and a control when given."""

from keras_biasinject.models.load import load
from keras_biasinject.rewrite.adapter_file import load_adapter


def generate(spec, prompts, adapter=None, control=None, max_length=64):
    """Greedy generations for `prompts` from the causal LM `spec` (a name, .gguf, folder or preset).

    `adapter`: a folder written by `save_adapter`; `control`: a vector, or a stored control name,
    which needs an adapter (a plain model has no control input)."""
    if adapter is None and control is not None:
        raise ValueError("generate: --control needs --adapter (a plain model has no control input).")
    lm = load(spec, task="causal_lm")
    lm.compile(sampler="greedy")
    if adapter is not None:
        lm = load_adapter(lm, adapter)
    kwargs = {} if control is None else {"control": control}
    outputs = lm.generate(list(prompts), max_length=max_length, **kwargs)
    return [outputs] if isinstance(outputs, str) else list(outputs)
