"""FineTuneVisualGLMModel: VisualGLM with LoRA, QLoRA or P-tuning v2 adapters (spec 8.1-8.3).

    --use_lora     sat's LoraMixin on the GLM layers in --layer_range (a list of layer indices; default
                   all): attention.query_key_value gets three LoRA pairs (Q, K, V), attention.dense one.
                   The frozen layer lives in `.original`; out = original(x) + (x A_i^T) B_i^T / r.
    --use_qlora    the same LoRA, but every linear layer of the GLM is a 4-bit NF4 bitsandbytes layer.
    --use_ptuning  sat's PTuningV2Mixin: per layer, pre_seq_len trained key/value vectors appended to
                   the attention keys/values (`mixins.ptuning.prefix.<layer>`, [2, heads, len, head_dim]).

Only the adapter tensors train (`disable_untrainable_params`). The whole model is saved, so a fine-tune
folder is a self-contained sat checkpoint that `load_model` / cli_demo.py load directly.

Loading (model/sat/checkpoint.py builds on the meta device and assigns the tensors):
  * `adapt_state_dict` lets a plain VisualGLM file fill a LoRA model (`...query_key_value.weight` ->
    `...query_key_value.original.weight`);
  * `init_missing` gives adapters absent from the file (fine-tuning a base model) their initial values:
    LoRA A kaiming-uniform(a=sqrt 5), LoRA B zeros (so the model starts equal to the base), P-tuning
    prefixes N(0, 1) * 0.01.

QLoRA layers (`NF4Linear`) quantize lazily on `.to(device)` or at their first forward (so a model
loaded on the CPU quantizes on the GPU it is moved to), without double quantization, and are saved
as their dequantized float values: the file holds plain tensors (weights-only loadable, mergeable
without bitsandbytes) and reloading re-quantizes to bit-identical 4-bit weights. Such a file is as large
as a LoRA one.
"""
import argparse
import math

import warnings

import torch
import torch.nn as nn

from ..configs import add_adapter_args
from .visualglm import VisualGLMModel

LORA_KEYS = ("matrix_A", "matrix_B")
PTUNING_KEY = "mixins.ptuning."
ADAPTER_ARGS = ("pre_seq_len", "lora_rank", "layer_range", "use_ptuning", "use_lora", "use_qlora")


def is_adapter_key(name: str) -> bool:
    """True for the tensors that the adapters add (and that may be missing from a base checkpoint)."""
    return any(k in name for k in LORA_KEYS) or name.startswith(PTUNING_KEY)


def _replace_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


# ----------------------------------------------------------------------------------------------
# QLoRA base layer

_NF4_CLASS = None


def nf4_linear_class():
    """`NF4Linear`, defined on first use so that bitsandbytes is imported only for QLoRA."""
    global _NF4_CLASS
    if _NF4_CLASS is not None:
        return _NF4_CLASS
    import bitsandbytes.functional as bnb_f
    from bitsandbytes.nn import LinearNF4, Params4bit

    class NF4Linear(LinearNF4):
        """A frozen 4-bit NF4 linear layer (blocks of 64, no double quantization)."""

        def __init__(self, weight: torch.Tensor, bias=None):
            out_features, in_features = weight.shape
            super().__init__(in_features, out_features, bias=bias is not None, compress_statistics=False,
                             device="meta")
            self.weight = self._float_param(weight)
            if bias is not None:
                self.bias = nn.Parameter(bias, requires_grad=False)
            # bitsandbytes repacks weights for its AVX512-BF16 CPU kernel in eval mode; keep one code
            # path so that training, evaluation and saving see the same layout.
            self.support_avx512bf16_for_cpu = False

        @classmethod
        def from_layer(cls, layer: nn.Module) -> "NF4Linear":
            weight = layer.weight
            if getattr(weight, "bnb_quantized", False):
                weight = bnb_f.dequantize_4bit(weight.data, weight.quant_state)
            bias = None if layer.bias is None else layer.bias.data
            return cls(weight.data if isinstance(weight, nn.Parameter) else weight, bias)

        def _float_param(self, data: torch.Tensor):
            # Unquantized until .to(device) / the first forward: bitsandbytes quantizes on .to().
            return Params4bit(data, requires_grad=False, compress_statistics=False, quant_type="nf4",
                              blocksize=64, quant_storage=torch.uint8, module=self)

        @property
        def quantized(self) -> bool:
            return bool(getattr(self.weight, "bnb_quantized", False))

        def float_weight(self) -> torch.Tensor:
            """The weight as the layer computes with it: [out, in] in the float dtype it was loaded in."""
            if self.quantized:
                return bnb_f.dequantize_4bit(self.weight.data, self.weight.quant_state)
            return self.weight.data

        def forward(self, x):
            if not self.quantized:
                self.weight = self.weight.to(self.weight.device)  # quantizes in place
            # compute in the activations' dtype (bitsandbytes would default to fp32 for fp16 inputs)
            self.compute_dtype, self.compute_type_is_set = x.dtype, True
            return super().forward(x)

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            destination[prefix + "weight"] = self.float_weight().detach()
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            assign = local_metadata.get("assign_to_params_buffers", False)
            key = prefix + "weight"
            if key in state_dict:
                value = state_dict[key].detach()
                if not assign and not self.weight.is_meta:
                    value = value.to(device=self.weight.device, dtype=self.float_weight().dtype)
                self.weight = self._float_param(value)
            else:
                missing_keys.append(key)
            if self.bias is not None:
                key = prefix + "bias"
                if key not in state_dict:
                    missing_keys.append(key)
                elif assign or self.bias.is_meta:
                    self.bias = nn.Parameter(state_dict[key].detach(), requires_grad=self.bias.requires_grad)
                else:
                    with torch.no_grad():
                        self.bias.copy_(state_dict[key])

    _NF4_CLASS = NF4Linear
    return NF4Linear


# ----------------------------------------------------------------------------------------------
# the model

class FineTuneVisualGLMModel(VisualGLMModel):
    def __init__(self, args, transformer=None, params_dtype=torch.float32, **kwargs):
        super().__init__(args, transformer=transformer, params_dtype=params_dtype, **kwargs)
        self.use_ptuning = bool(getattr(args, "use_ptuning", False))
        self.use_lora = bool(getattr(args, "use_lora", False))
        self.use_qlora = bool(getattr(args, "use_qlora", False)) and not self.use_lora  # LoRA wins
        if self.use_ptuning:
            from sat.model.finetune.prompt_tuning import PTuningV2Mixin
            head_dim = args.hidden_size // args.num_attention_heads
            self.add_mixin("ptuning", PTuningV2Mixin(args.num_layers, head_dim, args.num_attention_heads,
                                                     args.pre_seq_len))
        if self.use_lora or self.use_qlora:
            self._add_lora(args)

    def _add_lora(self, args):
        from .compat import fix_sat_lora_row_parallel, fix_sat_qlora_dtype
        if self.use_qlora:
            fix_sat_qlora_dtype()
        fix_sat_lora_row_parallel()   # attention.dense's adapter across model-parallel ranks
        from sat.model.finetune import lora2
        layers = args.layer_range
        if layers is not None:
            layers = [int(i) for i in layers]
            given = " ".join(map(str, layers))
            if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
                raise ValueError(f"--layer_range {given}: layer indices must be distinct and >= 0 "
                                 f"(it lists layers, it is not a range)")
            kept = [i for i in layers if i < args.num_layers]
            if layers and not kept:     # an empty list is a merged model's: LoRA on no layer
                raise ValueError(f"--layer_range {given}: the model has layers 0..{args.num_layers - 1} only")
            if kept != layers:
                # the original default "0 14" names layers of the 28-layer model; on a smaller model
                # (e.g. the bundled visualglm-tiny) the layers that exist still get their adapters
                warnings.warn(f"--layer_range {given}: the model has {args.num_layers} layers; LoRA goes on "
                              f"layer(s) {' '.join(map(str, kept))} only")
                layers = kept
                args.layer_range = kept
        if args.lora_rank < 1:
            raise ValueError(f"--lora_rank must be >= 1, got {args.lora_rank}")
        self.add_mixin("lora", lora2.LoraMixin(args.num_layers, args.lora_rank, layer_range=layers,
                                               qlora=self.use_qlora), reinit=True)
        # sat's Hack* layers copy into existing tensors when loading (`.data.copy_`), which silently
        # does nothing for a model built on the meta device; our loader checks every key itself, so
        # they become the plain sat / torch classes they extend (same attributes, standard loading).
        plain = {lora2.HackLinear: nn.Linear, lora2.HackColumnParallelLinear: lora2.ColumnParallelLinear,
                 lora2.HackRowParallelLinear: lora2.RowParallelLinear}
        for module in self.transformer.modules():
            if isinstance(module, lora2.LoraLinear):
                if type(module.original) in plain:
                    module.original.__class__ = plain[type(module.original)]
                module.matrix_A.__class__ = nn.ParameterList
                module.matrix_B.__class__ = nn.ParameterList
        if self.use_qlora:
            nf4 = nf4_linear_class()
            for name, module in list(self.transformer.named_modules()):
                if isinstance(module, lora2.HackLinearNF4):
                    _replace_submodule(self.transformer, name, nf4.from_layer(module))

    # -- args ---------------------------------------------------------------------------------
    @classmethod
    def add_model_specific_args(cls, parser):
        add_adapter_args(parser)
        return super().add_model_specific_args(parser)

    @property
    def has_adapters(self) -> bool:
        return self.use_ptuning or self.use_lora or self.use_qlora

    def disable_untrainable_params(self):
        """Freeze everything but the adapters (names with 'ptuning', 'matrix_A' or 'matrix_B')."""
        keep = (["ptuning"] if self.use_ptuning else []) + \
               (["matrix_a", "matrix_b"] if self.use_lora or self.use_qlora else [])
        for name, param in self.named_parameters():
            if param.is_floating_point():  # (4-bit weights are integer tensors and never train)
                param.requires_grad_(any(k in name.lower() for k in keep))

    # -- loading --------------------------------------------------------------------------------
    def adapt_state_dict(self, state_dict: dict) -> dict:
        """Plain VisualGLM weights -> the LoRA layout; refuse adapters this model was not built with."""
        from .checkpoint import CheckpointError
        expected = self.state_dict()
        out = dict(state_dict)
        for key in expected:
            if ".original." in key and key not in out:
                plain = key.replace(".original.", ".")
                if plain in out:
                    out[key] = out.pop(plain)
        stray = [k for k in out if k not in expected and (is_adapter_key(k) or ".original." in k)]
        if stray:
            raise CheckpointError(
                f"The checkpoint holds adapter tensors this model was not built with (e.g. {stray[0]}; "
                f"{len(stray)} in all). Build the same adapters (--use_lora/--use_qlora with the same "
                f"--layer_range, --use_ptuning with the same --pre_seq_len), or fold LoRA into the base "
                f"weights first: python -m model.sat.merge_lora --from <dir> --to <new dir>.")
        return out

    def init_missing(self, names, device="cpu", dtype=torch.float32, parallel=None):
        """Initial values for adapter tensors the checkpoint did not have (seeded by args.seed).
        parallel: (plan, rank, size) of a model-parallel part; a tensor the plan cuts is drawn whole and
        cut, so that N ranks start from the very values one process would."""
        from .mp_split import shard
        plan, rank, size = parallel or ({}, 0, 1)
        from .checkpoint import CheckpointError
        other = [n for n in names if not is_adapter_key(n)]
        if other:
            raise CheckpointError(f"{len(other)} tensors were not loaded: {other[:8]}")
        generator = torch.Generator().manual_seed(int(getattr(self.args, "seed", 1234) or 0))
        params = dict(self.named_parameters())
        for name in sorted(names):
            old = params[name]
            shape = list(old.shape)
            if name in plan:
                shape[plan[name][0]] *= size                       # the whole tensor of one process
            value = torch.empty(shape, dtype=torch.float32)
            if "matrix_A" in name:
                nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
            elif "matrix_B" in name:
                value.zero_()
            else:
                value.normal_(0.0, 1.0, generator=generator).mul_(0.01)
            if name in plan:
                value = shard(value, *plan[name], rank, size)     # this rank's part: old.shape
            new = nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=old.requires_grad)
            _replace_submodule(self, name, new)

    # -- merging --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_lora(self) -> "FineTuneVisualGLMModel":
        """Fold LoRA into the base weights: W' = W + concat_i(B_i A_i) / r, in fp32, cast back (QLoRA:
        W is the dequantized NF4 weight, and every other NF4 layer becomes a float layer too). Leaves
        plain nn.Linear layers, so the state dict has the plain VisualGLM names again."""
        if "lora" not in self.mixins:
            return self
        from sat.model.finetune import lora2
        nf4 = _NF4_CLASS
        for name, module in list(self.transformer.named_modules()):
            if isinstance(module, lora2.LoraLinear):
                original = module.original
                weight = original.float_weight() if nf4 is not None and isinstance(original, nf4) \
                    else original.weight
                delta = torch.cat([b.float() @ a.float() for a, b in zip(module.matrix_A, module.matrix_B)])
                merged = (weight.float() + delta * module.scaling).to(weight.dtype)
                _replace_submodule(self.transformer, name, _plain_linear(merged, original.bias))
        if nf4 is not None:
            for name, module in list(self.transformer.named_modules()):
                if isinstance(module, nf4):
                    _replace_submodule(self.transformer, name, _plain_linear(module.float_weight(), module.bias))
        self.del_mixin("lora")
        self.use_lora = self.use_qlora = False
        for key, value in (("use_lora", False), ("use_qlora", False), ("layer_range", None)):
            setattr(self.args, key, value)
            if getattr(self, "config", None) is not None:
                self.config[key] = value
        return self


def lora_partition_plan(model) -> dict:
    """How the LoRA tensors of a model-parallel model are cut across ranks (entries of
    mp_split.partition_plan's Plan). A column-parallel layer (query_key_value) holds rows of its output:
    each B_i holds the rank's rows of output block i, A_i is whole. A row-parallel layer
    (attention.dense) holds columns of its input: A_i holds the rank's columns, B_i is whole."""
    from sat.model.finetune import lora2
    from sat.mpu import ColumnParallelLinear, RowParallelLinear
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, lora2.LoraLinear):
            if isinstance(module.original, ColumnParallelLinear):
                plan.update({f"{name}.matrix_B.{i}": (0, 1) for i in range(len(module.matrix_B))})
            elif isinstance(module.original, RowParallelLinear):
                plan.update({f"{name}.matrix_A.{i}": (1, 1) for i in range(len(module.matrix_A))})
    return plan


def _plain_linear(weight: torch.Tensor, bias) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone().to(weight.dtype), requires_grad=False)
    return layer


def adapter_config(args: argparse.Namespace) -> dict:
    """The adapter entries of model_config.json, from parsed flags."""
    return {k: getattr(args, k) for k in ADAPTER_ARGS if hasattr(args, k)}
