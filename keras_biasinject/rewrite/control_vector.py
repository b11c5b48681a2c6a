"""llama.cpp control vectors in and out: `load_control_vector`, `export_control_vector`.

A control vector is a GGUF file that llama.cpp reads with `--control-vector FILE` (and
`--control-vector-scaled FILE S`) and that repeng's `ControlVector.export_gguf` and llama.cpp's
`cvector-generator` write: `general.architecture = "controlvector"`, the metadata
`controlvector.model_hint` (the model family, e.g. "llama") and `controlvector.layer_count`, and one
1-D F32 tensor `direction.N` of width `n_embd` (the hidden size) per steered layer.

What llama.cpp does with it (ggml-org/llama.cpp; checked on its sources):
- `common/common.cpp`, `common_control_vector_load_one`: each `direction.N` (N >= 1; `direction.0`,
  other names, non-F32 or non-1-D tensors are refused) is multiplied by the file's scale (1 for
  `--control-vector`, S for `--control-vector-scaled FILE S`; several files add up) and stored at row
  N - 1 ("layer 1 at [0]"). `controlvector.layer_count` and `model_hint` are not read.
- `src/llama-adapter.cpp`, `llama_adapter_cvec::apply`: row N - 1 becomes `tensors[N]`, for N in
  1 .. n_layer - 1 ("there's never a tensor for layer 0"; rows past n_layer - 1 are ignored), kept
  only for `layer_start <= N <= layer_end` (`--control-vector-layer-range START END`, inclusive,
  default 1 .. n_layer).
- `src/models/llama.cpp`: in the loop `for il in 0 .. n_layer - 1`, after `cur = ffn_out + ffn_inp`
  (the block's output, the residual stream), `cur = build_cvec(cur, il)` adds `tensors[il]`.
So `direction.N` is added to the output of block N counted from 0: KerasHub's
`transformer_layer_N`, the (N+1)-th block. `direction.1` follows the second block; the first block
(`transformer_layer_0`) is never steered. repeng numbers layers the same way (its `hidden_layers`
index `model.layers`, from 0; its default is 1 .. n_layers - 1).

Here a control vector is a `kind="bias"` injection with `control_dim=1` on the layer whose output a
pre-norm residual block adds last to its residual stream (Llama's feed-forward down projection: the
block computes `h + down(...)`), so `(c - 0) V` adds exactly to the block's output: control `c`
equals llama.cpp's scale S, and `V` of block N holds `direction.N`. Post-norm blocks (BERT), blocks
that normalise the feed-forward output (Gemma 2 and 3) and encoder-decoders have no such layer and
are refused.
"""

import dataclasses
import math
import os
import re
import tempfile
import warnings

import numpy as np

from keras_biasinject.layers.bias_inject_dense import BiasInjectDense
from keras_biasinject.rewrite.inject import inject
from keras_biasinject.rewrite.injected_model import InjectedModel
from keras_biasinject.rewrite.kerashub import backbone_of
from keras_biasinject.rewrite.targets import blocks_of

ARCHITECTURE = "controlvector"  # general.architecture of a control vector file
_DIRECTION = re.compile(r"direction\.(\d+)")

# Pre-norm residual blocks of KerasHub 0.32 whose `call` ends with `output = residual + proj(...)`,
# nothing between the projection and the add but dropout: block class -> attribute holding `proj`.
_OUTPUT_PROJECTION = {
    "LlamaTransformerDecoder": "_feedforward_output_dense",  # Llama, Llama 3
    "MistralTransformerDecoder": "_feedforward_output_dense",
    "QwenTransformerDecoder": "_feedforward_output_dense",  # Qwen, Qwen 2
    "Qwen3TransformerDecoder": "_feedforward_output_dense",
    "Phi3Decoder": "feedforward_output_dense",
    "GemmaDecoderBlock": "ffw_linear",  # Gemma 1 only: Gemma 2/3 normalise after it (use_post_ffw_norm)
    "TransformerDecoder": "_feedforward_output_dense",  # GPT-2 and OPT (normalize_first=True, no cross-attention)
}
# The model hints llama.cpp's converter (its general.architecture) and repeng (Hugging Face's
# model_type) write for each backbone; the first is what `export_control_vector` writes.
_HINTS = {
    "LlamaBackbone": ("llama",),
    "Llama3Backbone": ("llama",),
    "MistralBackbone": ("llama", "mistral"),
    "QwenBackbone": ("qwen2",),
    "Qwen2Backbone": ("qwen2",),
    "Qwen3Backbone": ("qwen3",),
    "Phi3Backbone": ("phi3",),
    "GemmaBackbone": ("gemma",),
    "GPT2Backbone": ("gpt2",),
    "OPTBackbone": ("opt",),
}
_SUPPORTED = "Llama, Llama 3, Mistral, Qwen, Qwen 2, Qwen 3, Phi-3, Gemma (1), GPT-2 and OPT"


@dataclasses.dataclass
class ControlVector:
    """The contents of a control vector file (what llama.cpp reads from it, and its metadata)."""

    model_hint: str  # controlvector.model_hint ("" when the file has none)
    directions: dict  # {N: float32 array [n_embd]}: added to the output of block N (counted from 0)
    layer_count: int = None  # controlvector.layer_count as written (llama.cpp ignores it), or None


def read_control_vector(path):
    """Reads a GGUF control vector with the `gguf` package, checking it as llama.cpp does.

    Returns a `ControlVector`. Raises ValueError naming the file (and the tensor) for a file that is
    not GGUF, whose `general.architecture` is not "controlvector", or whose tensors are not
    `direction.N` (N >= 1), F32, 1-D, of one width and finite.
    """
    import gguf  # a dependency of this package (GGUF checkpoints); imported here to keep imports light

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Control vector file {path!r} does not exist (or is not a file). Pass the path of a .gguf control vector."
        )
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # the reader raises ValueError, struct.error, ... on anything but GGUF
        raise ValueError(
            f"{path!r} is not a GGUF file ({type(error).__name__}: {error}). A llama.cpp control vector is a .gguf "
            "file (written by llama.cpp's cvector-generator, repeng's ControlVector.export_gguf or export_control_vector)."
        ) from None
    architecture = _field(reader, "general.architecture")
    if architecture != ARCHITECTURE:
        what = "a model or LoRA file, not a control vector" if architecture else "no general.architecture"
        raise ValueError(
            f"{path!r}: general.architecture is {architecture!r}, not {ARCHITECTURE!r} ({what}). Pass a control vector "
            f"file, whose general.architecture is {ARCHITECTURE!r}."
        )
    hint = _field(reader, f"{ARCHITECTURE}.model_hint")
    count = _field(reader, f"{ARCHITECTURE}.layer_count")
    directions, width = {}, None
    for tensor in reader.tensors:
        match = _DIRECTION.fullmatch(tensor.name)
        layer = int(match.group(1)) if match else None
        if layer is None or layer == 0:
            raise ValueError(
                f"{path!r}: tensor {tensor.name!r} is not a direction of a layer: llama.cpp reads only tensors named "
                "'direction.N' with N >= 1 (the block N counted from 0 whose output it is added to). Remove or rename it."
            )
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or int(tensor.n_elements) != int(tensor.shape[0]):
            raise ValueError(
                f"{path!r}: tensor {tensor.name!r} is {tensor.tensor_type.name} with shape {list(map(int, tensor.shape))}; "
                "llama.cpp reads only 1-D F32 directions. Write it as a float32 vector of the model's hidden size."
            )
        values = np.array(tensor.data, dtype="float32").reshape(-1)  # a copy: the reader maps the file
        if width is not None and values.shape[0] != width:
            raise ValueError(
                f"{path!r}: tensor {tensor.name!r} has width {values.shape[0]}, but the directions before it have "
                f"width {width}; every direction of one file has the model's hidden size."
            )
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{path!r}: tensor {tensor.name!r} holds NaN or inf; a direction must be finite numbers.")
        width = values.shape[0]
        # As llama.cpp: two tensors for one layer ("direction.1", "direction.01") add up.
        directions[layer] = directions[layer] + values if layer in directions else values
    if not directions:
        raise ValueError(f"{path!r} holds no 'direction.N' tensor: there is nothing to steer with.")
    return ControlVector(model_hint=hint or "", directions=dict(sorted(directions.items())),
                         layer_count=None if count is None else int(count))


def _field(reader, key):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _output_projections(backbone, caller):
    """[(block, attribute)] for every block of `backbone`, or ValueError when its blocks have no layer
    whose output is added, last, to the residual stream (where llama.cpp adds a control vector)."""
    blocks = blocks_of(backbone)
    found = []
    for index, block in enumerate(blocks):
        name = type(block).__name__
        attr = _OUTPUT_PROJECTION.get(name)
        why = None
        if attr is None:
            why = f"its blocks are {name}, not a pre-norm residual block that ends in `residual + projection(...)`"
        elif name == "GemmaDecoderBlock" and block.use_post_ffw_norm:
            why = "its blocks normalise the feed-forward output before the residual add (use_post_ffw_norm, as Gemma 2 and 3)"
        elif name == "TransformerDecoder" and (not block.normalize_first or getattr(block, "_cross_attention_layer", None)):
            why = "its decoder blocks normalise after the residual add (normalize_first=False) or take cross-attention"
        if why is not None:
            raise ValueError(
                f"{caller}: {_class_name(backbone)} cannot carry a llama.cpp control vector: {why} (block {index}, "
                f"'{block.path}'). llama.cpp adds a control vector to each block's output, the residual stream; a "
                "bias adds exactly there only on the last projection of a pre-norm residual block (post-norm blocks "
                f"such as BERT's normalise after the add). Supported families: {_SUPPORTED}."
            )
        found.append((block, attr))
    return found


def _class_name(model):
    """The KerasHub class name of `model`, also once injected (`InjectedLlama3Backbone` -> `Llama3Backbone`)."""
    return (getattr(type(model), "_base_class", None) or type(model)).__name__


def _hints(backbone):
    name = _class_name(backbone)
    return _HINTS.get(name, (name.removesuffix("Backbone").lower(),))


def _check_number(value, name, caller):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise ValueError(f"{caller}: `{name}` must be a finite number. Got {name}={value!r}.")
    return float(value)


def _layer_range(layer_range, caller):
    if layer_range is None:
        return None
    ok = isinstance(layer_range, (list, tuple)) and len(layer_range) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in layer_range)
    if not ok or layer_range[0] > layer_range[1]:
        raise ValueError(
            f"{caller}: `layer_range` is (start, end), inclusive, in llama.cpp's numbering (direction.N for block N), "
            f"as --control-vector-layer-range START END, with start <= end. Got layer_range={layer_range!r}."
        )
    return int(layer_range[0]), int(layer_range[1])


def load_control_vector(model, path, name="on", strength=1.0, layer_range=None):
    """Splices a llama.cpp control vector (GGUF) into a KerasHub model, in place, and returns it.

    The model gets `kind="bias"` adapters with `control_dim=1` on the last projection of each block
    that the file steers; `V` of block N holds `direction.N`. Its control is llama.cpp's scale: at
    control `s` the model adds `s * direction.N` to the output of block N, as
    `--control-vector-scaled FILE s` does; at 0 (or without a control) it is the base model bit for
    bit. The control named `name` is `[strength]`. Every check (the file, the model's family, width
    and depth) runs before the model changes.

    Args:
        model: a KerasHub Backbone or Task of a pre-norm family (Llama, Mistral, Qwen, Phi-3, GPT-2,
            ...), not yet injected.
        path: the control vector `.gguf` file.
        name: the named control stored for `strength` (`model.generate(..., control="on")`).
        strength: llama.cpp's SCALE in `--control-vector-scaled FILE SCALE` (may be negative).
        layer_range: `(start, end)`, inclusive, as `--control-vector-layer-range START END`: only
            `direction.N` with start <= N <= end are loaded. None: all of them.

    Example:
    >>> lm = load_control_vector(lm, "happy.gguf", strength=0.8)   # control "on" = [0.8]
    >>> lm.generate("I feel", max_length=20, control="on")
    >>> lm.generate("I feel", max_length=20, control=[[-0.5]])      # the opposite direction
    """
    caller = "load_control_vector"
    backbone = backbone_of(model, owner=caller)
    if isinstance(model, InjectedModel) or isinstance(backbone, InjectedModel):
        raise ValueError(f"{caller}: this {type(model).__name__} is already injected; load a control vector into the "
                         "base model (or call `remove(model)` first).")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{caller}: `name` must be a non-empty string. Got name={name!r}.")
    strength = _check_number(strength, "strength", caller)
    layer_range = _layer_range(layer_range, caller)
    projections = _output_projections(backbone, caller)
    vector = read_control_vector(path)
    path = os.fspath(path)

    n_blocks = len(projections)
    block, attr = projections[0]
    width = int(getattr(block, attr).kernel.shape[-1])
    got = len(next(iter(vector.directions.values())))
    first = next(iter(vector.directions))
    if got != width:
        raise ValueError(
            f"{caller}: {path!r} tensor 'direction.{first}' has width {got}, but {_class_name(backbone)}'s hidden size "
            f"is {width}: the vector was made for another model (model_hint {vector.model_hint!r}). Use a control "
            f"vector made for this model, with {width} values per direction."
        )
    too_deep = [n for n in vector.directions if n >= n_blocks
                and (layer_range is None or layer_range[0] <= n <= layer_range[1])]
    if too_deep:
        raise ValueError(
            f"{caller}: {path!r} has tensor 'direction.{too_deep[0]}' (directions {_span(vector.directions)}, "
            f"layer_count {vector.layer_count}), but {_class_name(backbone)} has {n_blocks} blocks, so llama.cpp "
            f"layers 1..{n_blocks - 1}: the vector was made for a deeper model. Use a control vector made for this model "
            f"(or keep its first layers with layer_range=(1, {n_blocks - 1}))."
        )
    chosen = {n: d for n, d in vector.directions.items()
              if n < n_blocks and (layer_range is None or layer_range[0] <= n <= layer_range[1])}
    if not chosen:
        raise ValueError(f"{caller}: layer_range={layer_range} keeps none of the directions of {path!r} "
                         f"({_span(vector.directions)}). Widen the range.")
    hints = _hints(backbone)
    if vector.model_hint and vector.model_hint not in hints:
        warnings.warn(
            f"{caller}: {path!r} was made for model_hint {vector.model_hint!r}, and this is a {_class_name(backbone)} "
            f"({', '.join(map(repr, hints))}); its width and depth fit, so it is loaded, as llama.cpp would.",
            stacklevel=2,
        )

    paths = [getattr(projections[n][0], projections[n][1]).path for n in chosen]
    model = inject(model, targets=paths, kind="bias", control_dim=1, gate="control", neutral=0.0)
    for n, direction in chosen.items():
        adapter = getattr(*projections[n])
        adapter.control_kernel.assign(direction.reshape(tuple(adapter.control_kernel.shape)))
    model.add_control(name, [strength])
    return model


def _span(directions):
    keys = sorted(directions)
    return f"direction.{keys[0]}" + (f"..direction.{keys[-1]}" if len(keys) > 1 else "")


def export_control_vector(model, path, control=None, model_hint=None):
    """Writes the control adapters of `model` as a llama.cpp control vector (GGUF), as repeng does.

    `model` is injected with `kind="bias"` and `control_dim=1` on the last projections of its blocks
    (what `load_control_vector` makes, trained or not). `direction.N` is `V` of block N, so that
    llama.cpp at `--control-vector-scaled FILE s` computes what the model computes at control
    `neutral + s`. With `control` given, the file holds `(control - neutral) V` instead: llama.cpp at
    scale 1 then computes what the model computes at that control. Returns the path.

    Args:
        model: the injected Backbone or Task.
        path: the `.gguf` file to write (written whole or not at all).
        control: None, one value, or a stored control name (`"on"`).
        model_hint: `controlvector.model_hint`; default the family's ("llama" for Llama 3).

    Example:
    >>> export_control_vector(lm, "happy.gguf")
    >>> # llama-cli -m model.gguf --control-vector-scaled happy.gguf 0.8
    """
    import gguf

    caller = "export_control_vector"
    report = getattr(model, "injection", None)
    if not isinstance(model, InjectedModel) or report is None:
        raise ValueError(f"{caller}: expected a model returned by `inject` or `load_control_vector`; got a plain "
                         f"{type(model).__name__}, which has no control adapters to export.")
    several = getattr(report, "adapters", None)  # a model with several named adapters
    if isinstance(several, dict) and len(several) > 1:
        raise ValueError(
            f"{caller}: this {type(model).__name__} holds several adapters ({list(several)}); a llama.cpp control vector "
            "holds one vector per block. Export from a model that holds only the control vector's adapter."
        )
    config = report.config
    if getattr(config, "kind", None) != "bias" or config.control_dim != 1:
        raise ValueError(
            f"{caller}: a llama.cpp control vector is one vector added per block: it holds a model injected with "
            f"kind='bias' and control_dim=1. This one has kind={getattr(config, 'kind', None)!r}, control_dim={config.control_dim}. "
            "Inject with `kind='bias', control_dim=1` on the blocks' output projections (or use `load_control_vector`)."
        )
    backbone = backbone_of(model, owner=caller)
    projections = _output_projections(backbone, caller)
    adapters = {n: getattr(block, attr) for n, (block, attr) in enumerate(projections)
                if isinstance(getattr(block, attr), BiasInjectDense)}
    outside = sorted(set(report.paths) - {a.path for a in adapters.values()} - {a.base_layer.path for a in adapters.values()})
    if outside:
        raise ValueError(
            f"{caller}: layers {outside[:4]} are adapted, but a llama.cpp control vector adds only to each block's output, "
            f"the last projection of a block ({[a.base_layer.path for a in adapters.values()][:2]} ...). Inject only "
            "those layers to export."
        )
    neutral = float(np.asarray(config.neutral, dtype="float64").reshape(-1)[0])
    scale = 1.0
    if control is not None:
        values = np.asarray(model.resolve_control(control), dtype="float64").reshape(-1)
        if values.shape != (1,) or not np.isfinite(values[0]):
            raise ValueError(f"{caller}: `control` must be one finite value (control_dim=1) or a stored control name "
                             f"({sorted(model.named_controls)}). Got control={control!r}.")
        scale = float(values[0]) - neutral
    directions = {}
    for n, adapter in adapters.items():
        v = np.asarray(adapter.control_kernel.numpy(), dtype="float32").reshape(-1)
        if n == 0:
            if np.any(v != 0):
                raise ValueError(
                    f"{caller}: '{adapter.path}' (block 0) has a non-zero V, but llama.cpp never steers the output of "
                    "the first block (it refuses 'direction.0'). Re-inject with blocks 1 and up (or zero its V) to export."
                )
            continue
        directions[n] = v if control is None else (v * np.float32(scale)).astype("float32")
    if not directions:
        raise ValueError(f"{caller}: no block past the first has a control adapter on its output; there is nothing to write.")
    hint = _hints(backbone)[0] if model_hint is None else model_hint
    if not isinstance(hint, str):
        raise ValueError(f"{caller}: `model_hint` must be a string such as 'llama'. Got model_hint={model_hint!r}.")

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{caller}: folder {folder!r} of path={path!r} does not exist. Create it first.")
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
    os.close(handle)
    try:  # as repeng's ControlVector.export_gguf
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", hint)
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(directions))
        for n, direction in directions.items():
            writer.add_tensor(f"direction.{n}", direction)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # as a plain open() would make it (mkstemp makes 0o600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
