"""`load_peft_adapter` / `export_peft`: Hugging Face PEFT LoRA folders in and out.

A PEFT LoRA folder is `adapter_config.json` (`r`, `lora_alpha`, `target_modules`, ...) plus
`adapter_model.safetensors` with, per adapted `nn.Linear` `W` (`[out, in]`), `...lora_A.weight`
(`[r, in]`) and `...lora_B.weight` (`[out, r]`); PEFT computes `W x + s B A x` with `s = lora_alpha / r`
(`lora_alpha / sqrt(r)` with `use_rslora`; per module with `rank_pattern` / `alpha_pattern`).

KerasHub stores the same weight as a kernel `K = W^T` reshaped, with the input axes first:
`[hidden, heads, head_dim]` for q/k/v, `[heads, head_dim, hidden]` for o, `[in, out]` for the MLP.
Our `LoRABiasAdapter` has `A` of the kernel's shape with its last axis replaced by the rank and `B`
`[rank, kernel.shape[-1]]`. Where the kernel's output is one axis (o, MLP) PEFT's factors are ours
(`A = A_p^T`, `B = B_p^T`). For q/k/v the output is `(heads, head_dim)` and `B` is shared by all heads,
so an update of PEFT rank `r` becomes rank `r * heads`: component `(j, head)` carries `A_p[j]` into that
head only (`A[:, u, (j, u')] = A_p[j] [u == u']`, `B[(j, u'), :] = B_p[u' head, :, j]`), or, when
`head_dim` is smaller, rank `head_dim` with `B = I`. Both are exact; components a module does not need
are zero. Every module's PEFT scale is folded into its `B`; our `alpha` is the rank (scale 1).

Module names map between Hugging Face Llama (`model.layers.{i}.self_attn.q_proj`, ...) and the
KerasHub Llama blocks (`transformer_layers[i]._self_attention_layer._query_dense`, ...): Llama,
Llama 3 and SmolLM2 checkpoints, converted by KerasHub from the same Hugging Face weights.
"""

import json
import math
import re
import struct
from pathlib import Path

import keras
import numpy as np
from keras import ops
from safetensors.numpy import save

from keras_biasinject.atomic import atomic_dir
from keras_biasinject.layers import ControlAdapter
from keras_biasinject.layers.bias_inject_dense import BiasInjectDense
from keras_biasinject.layers.lora_bias_adapter import GATES, LoRABiasAdapter
from keras_biasinject.rewrite.inject import inject
from keras_biasinject.rewrite.injected_model import InjectedModel
from keras_biasinject.rewrite.kerashub import backbone_of
from keras_biasinject.rewrite.targets import blocks_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model (LlamaForCausalLM)

# Hugging Face Llama module (under `model.layers.{i}.`) -> attributes leading to it from a KerasHub Llama block.
LLAMA_MODULES = {
    "self_attn.q_proj": ("_self_attention_layer", "_query_dense"),
    "self_attn.k_proj": ("_self_attention_layer", "_key_dense"),
    "self_attn.v_proj": ("_self_attention_layer", "_value_dense"),
    "self_attn.o_proj": ("_self_attention_layer", "_output_dense"),
    "mlp.gate_proj": ("_feedforward_gate_dense",),
    "mlp.up_proj": ("_feedforward_intermediate_dense",),
    "mlp.down_proj": ("_feedforward_output_dense",),
}
_KEY = re.compile(  # base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
    r"base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)"
)

# PEFT options that change what the adapter computes and that our adapters cannot hold (any truthy value refused).
REFUSED = {
    "use_dora": "DoRA rescales each output column by a learned magnitude",
    "modules_to_save": "whole layers are retrained and saved beside the LoRA weights",
    "trainable_token_indices": "embedding rows are retrained",
    "target_parameters": "LoRA on raw parameters (mixture-of-experts weights)",
    "layer_replication": "layers are repeated to make a deeper model",
    "alora_invocation_tokens": "aLoRA applies the update only after invocation tokens",
    "use_qalora": "QALoRA pools the input in groups",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes between several adapters per token",
    "kasa_config": "KaSA changes the base weights and adds a singular-value diagonal",
    "monteclora_config": "MonteCLoRA samples the factors",
}
# Options that do not change the inference output here (metadata, training-only settings, configs of the
# initialisations checked through `init_lora_weights`); PEFT itself ignores `fan_in_fan_out` for nn.Linear.
IGNORED = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "lora_bias", "init_lora_weights", "bias",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "fan_in_fan_out",
    "megatron_config", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "velora_config", "ensure_weight_tying", "runtime_config",
}
# Initialisations that leave the base weights as they are (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA and MiCA
# change them or the forward pass).
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


# ---- reading a PEFT folder ---------------------------------------------------------------------


def _read_config(file):
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"load_peft_adapter: {str(file)!r} is not readable JSON ({error}). Pass a folder written by "
                         "PEFT's `save_pretrained`.") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_peft_adapter: {str(file)!r} must hold a JSON object; got {type(config).__name__}.")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_peft_adapter: {str(file)!r} has peft_type={config.get('peft_type')!r}; only LoRA "
                         "adapters (peft_type='LORA') can be turned into ours.")
    for option, why in REFUSED.items():
        if config.get(option):
            raise ValueError(f"load_peft_adapter: {str(file)!r} sets {option}={config[option]!r} ({why}); our adapters "
                             f"cannot represent it. Train the PEFT adapter without `{option}`.")
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise ValueError(f"load_peft_adapter: {str(file)!r} has init_lora_weights={init!r}, which changes the base "
                         "weights (or the forward pass) when the adapter is made, so the adapter does not apply to the "
                         "original base. Convert it to a plain LoRA first (PEFT's `save_pretrained(..., "
                         "path_initial_model_for_weight_conversion=...)`).")
    unknown = sorted(k for k, v in config.items()
                     if k not in IGNORED and k not in REFUSED and v not in (None, False, [], {}, ""))
    if unknown:
        raise ValueError(f"load_peft_adapter: {str(file)!r} sets PEFT option(s) {unknown} that load_peft_adapter does not "
                         f"know (peft_version={config.get('peft_version')!r}); it cannot tell whether they change the "
                         "adapter's output. Save the adapter without them.")
    for name in ("r", "lora_alpha"):
        if not isinstance(config.get(name, 8), (int, float)) or isinstance(config.get(name), bool):
            raise ValueError(f"load_peft_adapter: {str(file)!r}: `{name}` must be a number; got {config.get(name)!r}.")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise ValueError(f"load_peft_adapter: {str(file)!r}: `{name}` must be a mapping; got {config.get(name)!r}.")
    return config


def read_safetensors(file, owner):
    """{name: float32 array} of a safetensors file (F64, F32, F16 or BF16: PEFT saves in the model's dtype)."""
    try:
        data = file.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{owner}: {str(file)!r} is not a safetensors file ({error}).") from None
    start, tensors = 8 + size, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], [int(n) for n in info["shape"]], info["data_offsets"]
            values = np.frombuffer(data[start + begin : start + end], dtype=dtype).reshape(shape)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{owner}: {str(file)!r}: tensor {name!r} is unreadable (dtype {info.get('dtype')!r}, "
                             f"{error}); PEFT adapters are F32, F16 or BF16.") from None
        if info["dtype"] == "BF16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        values = values.astype(np.float32)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{owner}: {str(file)!r}: tensor {name!r} holds NaN or inf. Use a finite adapter.")
        tensors[name] = values
    return tensors


def _pattern_value(patterns, module, default):
    """PEFT's `get_pattern_key`: the first pattern `p` with `re.match(rf"(.*\\.)?({p})$", module)`."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _llama_layer(block, module):
    layer = block
    for attr in LLAMA_MODULES[module]:
        layer = getattr(layer, attr, None)
    return layer


def _axes(layer):
    """(input axes, middle output axes, last axis) of the kernel, which is `W^T` reshaped with its input axes first."""
    shape = tuple(layer.kernel.shape)
    if isinstance(layer, keras.layers.Dense):
        return shape[:1], (), shape[1]
    x_spec, k_spec = layer.equation.replace(" ", "").split("->")[0].split(",")
    n_in = sum(ch in x_spec for ch in k_spec)
    if any(ch in x_spec for ch in k_spec[n_in:]):
        raise ValueError(f"PEFT folders: layer '{layer.path}' (equation {layer.equation!r}) does not keep its input "
                         "axes first, so it is not a Hugging Face nn.Linear weight transposed; it has no PEFT counterpart.")
    return shape[:n_in], shape[n_in:-1], shape[-1]


def _to_ours(a_p, b_p, layer):
    """PEFT's `A_p` (`[r, in]`) and `B_p` (`[out, r]`, the scale folded in) as our `(A, B)`; rank as needed."""
    ins, mids, last = _axes(layer)
    r, n_in, heads = a_p.shape[0], math.prod(ins), math.prod(mids)
    if not mids:
        return a_p.T.reshape(ins + (r,)), b_p.T
    b_heads = b_p.reshape(heads, last, r)  # (u, h, r)
    if r * heads <= last:  # component (j, u'): A_p[j] into head u' only
        a = np.zeros((n_in, heads, r, heads))
        for u in range(heads):
            a[:, u, :, u] = a_p.T
        b = b_heads.transpose(2, 0, 1)  # (r, u', h)
        return a.reshape(ins + mids + (r * heads,)), b.reshape(r * heads, last)
    delta = np.einsum("ri,uhr->iuh", a_p, b_heads)  # the whole update, B = I
    return delta.reshape(ins + mids + (last,)), np.eye(last)


def _peft_modules(config, tensors, blocks, file):
    """{(block, module): (layer, A_p, B_p scaled)} checked against the model; raises naming the tensor."""
    found = {}
    for name, values in tensors.items():
        match = _KEY.fullmatch(name)
        if match is None:
            raise ValueError(f"load_peft_adapter: {str(file)!r}: tensor {name!r} is not the LoRA A/B weight of a Llama "
                             f"q/k/v/o or gate/up/down projection ({', '.join(LLAMA_MODULES)}); our adapters cannot "
                             "hold it. Train the PEFT adapter with `target_modules` among those projections.")
        block, module, part = int(match[1]), match[2], match[3]
        if block >= len(blocks):
            raise ValueError(f"load_peft_adapter: {str(file)!r}: tensor {name!r} adapts layer {block}, but this model has "
                             f"{len(blocks)} blocks: the adapter was trained on another base "
                             f"(base_model_name_or_path={config.get('base_model_name_or_path')!r}).")
        found.setdefault((block, module), {})[part] = (name, values)
    modules = {}
    for (block, module), parts in sorted(found.items()):
        layer = _llama_layer(blocks[block], module)
        if layer is None:
            raise ValueError(f"load_peft_adapter: {type(blocks[block]).__name__} has no layer for the Hugging Face module "
                             f"'{module}'; load_peft_adapter maps Llama modules to KerasHub Llama blocks.")
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            missing = "lora_A.weight" if "lora_A.weight" not in parts else "lora_B.weight"
            raise ValueError(f"load_peft_adapter: {str(file)!r} has no tensor '{PREFIX}model.layers.{block}.{module}."
                             f"{missing}' to go with the other half of that module's LoRA. Save the adapter again.")
        (a_name, a_p), (b_name, b_p) = parts["lora_A.weight"], parts["lora_B.weight"]
        ins, mids, last = _axes(layer)
        n_in, n_out = math.prod(ins), math.prod(mids) * last
        hf_name = f"model.layers.{block}.{module}"
        r = _pattern_value(config.get("rank_pattern"), hf_name, config.get("r", 8))
        for tensor, values, want in ((a_name, a_p, (r, n_in)), (b_name, b_p, (n_out, r))):
            if values.shape != want:
                raise ValueError(
                    f"load_peft_adapter: {str(file)!r}: tensor {tensor!r} has shape {list(values.shape)}, but layer "
                    f"'{layer.path}' of this model (kernel {list(layer.kernel.shape)}) with r={r} needs {list(want)}: "
                    f"the adapter was trained on another base (base_model_name_or_path="
                    f"{config.get('base_model_name_or_path')!r}) or its config's r/rank_pattern disagree with its weights."
                )
        if "lora_B.bias" in parts and np.any(parts["lora_B.bias"][1]):
            raise ValueError(f"load_peft_adapter: {str(file)!r}: lora_bias=True and tensor {parts['lora_B.bias'][0]!r} "
                             "is not zero: a constant bias at the neutral control has no place in our adapters (their "
                             "control bias (c - neutral) V is zero there). Train the PEFT adapter with lora_bias=False.")
        alpha = _pattern_value(config.get("alpha_pattern"), hf_name, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[(block, module)] = (layer, a_p.astype(np.float64), b_p.astype(np.float64) * scale)
    if not modules:
        raise ValueError(f"load_peft_adapter: {str(file)!r} holds no LoRA weights. Pass a folder written by PEFT's "
                         "`save_pretrained` after training.")
    return modules


def _check_targets(config, file):
    """A list of target names must name Llama projections (a regex string is checked through the weights)."""
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        for target in targets:
            short = re.sub(r"^.*?layers\.\d+\.", "", str(target))
            if target != "all-linear" and not any(m == short or m.endswith("." + short) for m in LLAMA_MODULES):
                raise ValueError(f"load_peft_adapter: {str(file)!r}: target_modules names {target!r}, which is not a "
                                 f"projection our adapters can wrap ({sorted(LLAMA_MODULES)}). Train "
                                 "the PEFT adapter without it (lm_head and embed_tokens are not supported).")


def load_peft_adapter(model, folder, control_dim=1, neutral=0.0):
    """Turns a Hugging Face PEFT LoRA folder into our adapters (gate "always") and returns the model.

    The folder must be a LoRA trained on the Hugging Face version of the same base (`adapter_config.json`
    and `adapter_model.safetensors`, as `PeftModel.save_pretrained` writes them). At the neutral control
    the model computes what PEFT computes; the control then scales the whole update: `c - neutral = 1`
    doubles it, and the named control "off" (`c - neutral = -1` on the first control input) turns it
    off exactly, while the adapter's control gains are as loaded (ones). Everything is checked before
    the model changes: on error it is exactly as it was.

    Args:
        model: a KerasHub Llama-architecture backbone or task (Llama, Llama 3, SmolLM2), not injected.
        folder: the PEFT folder.
        control_dim, neutral: as for `inject`.

    Example:
    >>> lm = load("smollm2-135m", task="causal_lm")
    >>> lm = load_peft_adapter(lm, "my-peft-lora")        # PEFT's output at the neutral control
    >>> lm.generate("Hi", control="off")                   # the base model exactly
    >>> lm.generate("Hi", control=[0.5])                   # the LoRA update at 1.5 times its strength
    """
    folder = Path(folder)
    files = (folder / CONFIG_FILE, folder / WEIGHTS_FILE)
    for file in files:
        if not file.is_file():
            raise ValueError(f"load_peft_adapter: folder={str(folder)!r} has no {file.name}; pass a folder written by "
                             "PEFT's `save_pretrained` (adapter_config.json and adapter_model.safetensors).")
    if isinstance(model, InjectedModel) or isinstance(getattr(model, "backbone", None), InjectedModel):
        raise ValueError("load_peft_adapter: this model is already injected; load the PEFT adapter into the base model "
                         "(`remove(model)` first).")
    config = _read_config(files[0])
    _check_targets(config, files[0])
    tensors = read_safetensors(files[1], "load_peft_adapter")
    modules = _peft_modules(config, tensors, blocks_of(backbone_of(model, "load_peft_adapter")), files[1])

    factors = {key: _to_ours(a_p, b_p, layer) for key, (layer, a_p, b_p) in modules.items()}
    rank = max(a.shape[-1] for a, _ in factors.values())  # every scale is folded into B: alpha = rank
    paths = "|".join(re.escape(layer.path) for layer, _, _ in modules.values())
    model = inject(model, targets=f"(?:{paths})", rank=rank, alpha=rank, gate="always",
                   control_dim=control_dim, neutral=neutral)
    for (block, module), (a, b) in factors.items():
        adapter = _llama_layer(blocks_of(backbone_of(model))[block], module)
        a_full, b_full = np.zeros(tuple(adapter.lora_a.shape)), np.zeros(tuple(adapter.lora_b.shape))
        a_full[..., : a.shape[-1]], b_full[: b.shape[0]] = a, b
        adapter.lora_a.assign(a_full.astype(np.float32))
        adapter.lora_b.assign(b_full.astype(np.float32))
    off = np.broadcast_to(np.asarray(model.injection.config.neutral, "float64"), (control_dim,)).copy()
    off[0] -= 1.0  # strength 1 + (c - neutral) U = 1 - 1 = 0 while U is ones
    model.add_control("off", off)
    return model


# ---- writing a PEFT folder ---------------------------------------------------------------------


def _export_control(model, control):
    dim = model.injection.config.control_dim
    neutral = np.broadcast_to(np.asarray(model.injection.config.neutral, "float64"), (dim,))
    if control is None:
        return np.zeros(dim)
    values = np.asarray(ops.convert_to_numpy(model.resolve_control(control)), "float64")
    if values.shape not in ((dim,), (1, dim)) or not np.all(np.isfinite(values)):
        raise ValueError(f"export_peft: `control` must be a named control or {dim} finite number(s) (control_dim={dim}); "
                         f"got control={control!r}. PEFT folders hold one fixed control.")
    return values.reshape(dim) - neutral


def _to_peft(adapter, d, layer):
    """Our adapter at the centred control `d` as PEFT's `(A_p [r, in], B_p [out, r], bias [out])`, scaling 1."""
    ins, mids, last = _axes(layer)
    n_in, heads = math.prod(ins), math.prod(mids)
    bias = np.einsum("k,k...->...", d, ops.convert_to_numpy(adapter.control_kernel).astype(np.float64)).reshape(-1)
    if isinstance(adapter, BiasInjectDense):  # a bias only: a rank-1 LoRA of zeros plus PEFT's lora_B bias
        return np.zeros((1, n_in)), np.zeros((heads * last, 1)), bias
    strength = GATES[adapter.gate] + d @ ops.convert_to_numpy(adapter.control_gain).astype(np.float64)  # (R,)
    a = ops.convert_to_numpy(adapter.lora_a).astype(np.float64) * strength  # (*ins, *mids, R)
    b = ops.convert_to_numpy(adapter.lora_b).astype(np.float64) * adapter.scale  # (R, last)
    rank = a.shape[-1]
    a = a.reshape(n_in, heads, rank)
    a_p = a.transpose(2, 1, 0).reshape(rank * heads, n_in)  # component (j, u'): A[:, u', j] into head u' only
    b_p = np.zeros((heads, last, rank, heads))
    for u in range(heads):
        b_p[u, :, :, u] = b.T
    return (*_compact(a_p, b_p.reshape(heads * last, rank * heads)), bias)


def _compact(a_p, b_p):
    """`B_p A_p` with the fewest components, found on `k x k` Gram matrices (k: the components used).

    With `A_p A_p^T = V_a E_a V_a^T` and `B_p^T B_p = V_b E_b V_b^T`, the SVD of the small core
    `E_b^(1/2) V_b^T V_a E_a^(1/2) = U S Z^T` gives `B_p A_p = (Q_b U S^(1/2)) (S^(1/2) Z^T Q_a^T)`, with
    `Q_a^T = E_a^(-1/2) V_a^T A_p` and `Q_b = B_p V_b E_b^(-1/2)`. Directions whose singular value is below
    1e-6 of the largest are dropped: beyond float32's seven digits (where the rank is exactly lower, as
    for an adapter imported from PEFT, they are float64 rounding). Only matrix products touch the big
    axes (LAPACK's QR on them is slow when PyTorch's threads are also running)."""
    used = np.any(a_p, axis=1) & np.any(b_p, axis=0)  # most (component, head) pairs are zero for q/k/v
    if not used.any():
        return np.zeros((1, a_p.shape[1])), np.zeros((b_p.shape[0], 1))
    a_p, b_p = a_p[used], b_p[:, used]

    def directions(gram):
        values, vectors = np.linalg.eigh(gram)
        keep = values > 1e-12 * values.max()
        return vectors[:, keep], np.sqrt(values[keep])

    v_a, s_a = directions(a_p @ a_p.T)
    v_b, s_b = directions(b_p.T @ b_p)
    u, sv, zt = np.linalg.svd((v_b * s_b).T @ (v_a * s_a))  # the (k_b, k_a) core
    keep = max(1, int(np.sum(sv > 1e-6 * sv[0])))
    root = np.sqrt(sv[:keep])
    new_a = ((root[:, None] * zt[:keep]) @ (v_a / s_a).T) @ a_p  # (keep, in)
    new_b = b_p @ ((v_b / s_b) @ (u[:, :keep] * root))  # (out, keep)
    return new_a, new_b


def export_peft(model, folder, control=None, base_model_name_or_path=None, overwrite=False):
    """Writes our adapters at one fixed control as a PEFT LoRA folder that `PeftModel.from_pretrained` loads.

    For each adapted Llama projection the update at `control` (`A diag(g + (c - neutral) U) B` times
    `alpha / rank`) becomes PEFT's `lora_A`/`lora_B` with the fewest components that hold it (scaling 1;
    one rank per projection name, `rank_pattern` where they differ; an update imported from PEFT goes
    back at its own rank);
    the control bias `(c - neutral) V`, when it is not zero, becomes PEFT's `lora_B` bias (`lora_bias=True`).
    Kind "bias" adapters become a rank-1 LoRA of zeros with that bias. The folder is written atomically.

    Args:
        model: a model returned by `inject` (or `load_peft_adapter`) on a KerasHub Llama-architecture base.
        folder: where to write `adapter_config.json` and `adapter_model.safetensors`.
        control: a named control or `control_dim` numbers; None: the neutral control.
        base_model_name_or_path: written into the config for PEFT (the Hugging Face base), optional.
        overwrite: replace an existing folder.

    Example:
    >>> export_peft(lm, "peft-out", control=[1.0])
    >>> peft.PeftModel.from_pretrained(transformers_llama, "peft-out")   # (in PyTorch)
    """
    if not isinstance(model, InjectedModel) or getattr(model, "injection", None) is None:
        raise ValueError(f"export_peft: expected a model returned by `inject` or `load_peft_adapter`; got a plain "
                         f"{type(model).__name__}.")
    d = _export_control(model, control)
    blocks = blocks_of(backbone_of(model, "export_peft"))
    modules = {}
    for i, block in enumerate(blocks):
        for module in LLAMA_MODULES:
            adapter = _llama_layer(block, module)
            if isinstance(adapter, ControlAdapter):
                modules[(i, module)] = adapter
    placed = {id(a) for a in modules.values()}
    others = [layer.path for layer in model._flatten_layers(include_self=False, recursive=True)
              if isinstance(layer, ControlAdapter) and id(layer) not in placed]
    if others or not modules:
        raise ValueError(f"export_peft: adapter(s) {others[:3]} do not wrap a Llama q/k/v/o or gate/up/down projection; "
                         "PEFT folders for Llama name only those modules." if others else
                         "export_peft: this model has no adapters on Llama projections to export.")
    merged = [a.path for a in modules.values() if a.merged]
    if merged:
        raise ValueError(f"export_peft: adapter {merged[0]!r} is merged; call its `unmerge()` first.")
    unknown = [a.path for a in modules.values() if not isinstance(a, (LoRABiasAdapter, BiasInjectDense))]
    if unknown:
        raise ValueError(f"export_peft: adapter {unknown[0]!r} is of a kind export_peft does not know.")

    factors = {key: _to_peft(adapter, d, adapter.base_layer) for key, adapter in modules.items()}
    ranks = {}  # short module name -> its largest rank over the blocks; smaller ones are padded with zeros
    for (_, module), (a_p, _, _) in factors.items():
        short = module.split(".")[-1]
        ranks[short] = max(ranks.get(short, 0), a_p.shape[0])
    rank = max(ranks.values())
    pattern = {short: r for short, r in sorted(ranks.items()) if r != rank}  # alpha = rank everywhere: scaling 1
    lora_bias = any(np.any(bias) for _, _, bias in factors.values())
    tensors = {}
    for (block, module), (a_p, b_p, bias) in factors.items():
        key, r = f"{PREFIX}model.layers.{block}.{module}", ranks[module.split(".")[-1]]
        a_full, b_full = np.zeros((r, a_p.shape[1]), np.float32), np.zeros((b_p.shape[0], r), np.float32)
        a_full[: a_p.shape[0]], b_full[:, : b_p.shape[1]] = a_p, b_p
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a_full, b_full
        if lora_bias:
            tensors[f"{key}.lora_B.bias"] = bias.astype(np.float32)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": rank,  # scaling 1: every module's scale is in its lora_B
        **_target_modules(sorted(modules), len(blocks)),
        "lora_dropout": 0.0, "bias": "none", "lora_bias": lora_bias, "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": pattern,
        "alpha_pattern": pattern, "inference_mode": True,
    }
    for values in tensors.values():
        if not np.all(np.isfinite(values)):
            raise ValueError("export_peft: the adapter weights at this control are not finite; nothing was written.")
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt"}))
    return Path(folder)


def _target_modules(keys, n_blocks):
    """Short names (`q_proj`) plus `layers_to_transform` when the adapted modules are blocks x projections;
    else full module names."""
    blocks, names = sorted({b for b, _ in keys}), sorted({m for _, m in keys})
    if len(keys) == len(blocks) * len(names):
        layers = None if len(blocks) == n_blocks else blocks
        return {"target_modules": [m.split(".")[-1] for m in names], "layers_to_transform": layers}
    return {"target_modules": [f"model.layers.{b}.{m}" for b, m in keys], "layers_to_transform": None}
