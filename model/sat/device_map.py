"""One process, several devices: the vision encoder and ranges of GLM layers on different GPUs.

For two small GPUs (or a GPU and the CPU), the model is cut in pipeline fashion, with no parallel
computation: each part runs on its device in turn, and forward pre-hooks move the activations across.

    --device-map vision=cuda:0,glm=cuda:1                the image encoder on one GPU, the GLM on the other
    --device-map vision=cuda:0,glm=cuda:0+cuda:1         GLM layers split evenly (the first half with the encoder)
    --device-map vision=cuda:0,glm=cuda:0*10+cuda:1*18   ... or by layer counts (they must add up to all layers)

Parts: `vision` (EVA ViT + Q-Former + projection) and `glm` (word embeddings, the layers, the final
layer norm, the LM head). The word embeddings and the LM head (same size: 1 GB each in fp16 for 6B)
go to the first GLM device, the final layer norm with the last layer; the logits come out on the first
GLM device, where the decoding loop runs. A part left out goes where the other is.

Each layer's key/value cache stays on that layer's device (it is made there and only read there).
"""
import copy
from dataclasses import dataclass
from typing import List, Optional

import torch

from .checkpoint import CheckpointError


class DeviceMapError(CheckpointError):
    """A --device-map that cannot be parsed or does not fit the model / machine."""


@dataclass
class DeviceMap:
    vision: Optional[str]
    glm: List[tuple]            # [(device, layer count or None = an even share)]

    @property
    def devices(self) -> List[str]:
        return [d for d in [self.vision] + [d for d, _ in self.glm] if d is not None]


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceMapError(f"--device-map: {text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise DeviceMapError(f"--device-map: {text} is not available (this machine has {count} CUDA GPU(s))")
        return f"cuda:{device.index or 0}"      # as tensors report it
    return str(device)


def parse_device_map(spec: str) -> DeviceMap:
    """'vision=cuda:0,glm=cuda:0*10+cuda:1*18' -> DeviceMap (see the module's docstring)."""
    parts = {}
    for item in filter(None, (s.strip() for s in str(spec).split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in ("vision", "glm") or not value.strip():
            raise DeviceMapError(f"--device-map: cannot read {item!r}; expected vision=DEVICE and/or "
                                 f"glm=DEVICE[+DEVICE...] (a device may carry a layer count: cuda:1*14)")
        if name in parts:
            raise DeviceMapError(f"--device-map: {name} is given twice")
        parts[name] = value.strip()
    if not parts:
        raise DeviceMapError("--device-map is empty")
    glm = []
    for piece in parts.get("glm", "").split("+") if "glm" in parts else []:
        device, star, count = piece.strip().partition("*")
        if star and not (count.strip().isdigit() and int(count) > 0):
            raise DeviceMapError(f"--device-map: {piece!r}: the layer count after * must be a positive number")
        glm.append((_device(device.strip()), int(count) if star else None))
    if glm and len({c is None for _, c in glm}) > 1:
        raise DeviceMapError("--device-map: give a layer count for every GLM device or for none")
    vision = _device(parts["vision"]) if "vision" in parts else None
    return DeviceMap(vision=vision or glm[0][0], glm=glm or [(vision, None)])


def layer_devices(device_map: DeviceMap, num_layers: int) -> List[str]:
    """The device of each GLM layer, in order."""
    counts = [c for _, c in device_map.glm]
    if counts[0] is None:   # even shares, the first devices taking one more when it does not divide
        share, extra = divmod(num_layers, len(counts))
        counts = [share + (i < extra) for i in range(len(counts))]
    elif sum(counts) != num_layers:
        raise DeviceMapError(f"--device-map: the layer counts add up to {sum(counts)}, but the model has "
                             f"{num_layers} GLM layers")
    return [device for (device, _), n in zip(device_map.glm, counts) for _ in range(n)]


def _to(device):
    def move(x):
        return x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x
    return move


def _move_inputs(module: torch.nn.Module, device) -> None:
    """Before module runs, move its tensor arguments (not nested ones: a layer's `past_key_values` is the
    tuple of every layer's cache, each already on its own layer's device) to `device`."""
    move = _to(torch.device(device))

    def hook(_, args, kwargs):
        return tuple(move(a) for a in args), {k: v if k == "layer_id" else move(v) for k, v in kwargs.items()}
    module.register_forward_pre_hook(hook, with_kwargs=True)


def _move_output(module: torch.nn.Module, device) -> None:
    move = _to(torch.device(device))
    module.register_forward_hook(lambda _, args, out: move(out))


class RotaryPerDevice(torch.nn.Module):
    """sat's ChatGLM layers share one rotary embedding, which keeps its cos/sin on the device of the first
    call: one copy per device instead, picked by the device of the query it is called with."""

    def __init__(self, rotary, devices):
        super().__init__()
        self.copies = torch.nn.ModuleDict({self.key(d): copy.deepcopy(rotary).to(d) for d in devices})

    @staticmethod
    def key(device) -> str:
        return "on_" + str(device).replace(":", "_")        # "on_cuda_1": a valid, non-clashing module name

    def forward(self, x, *args, **kwargs):
        return self.copies[self.key(x.device)](x, *args, **kwargs)


def apply_device_map(model, device_map: DeviceMap):
    """Place the parts of a loaded VisualGLM model (on any device) as `device_map` says, in place."""
    glm = model.transformer
    per_layer = layer_devices(device_map, len(glm.layers))
    first, last = per_layer[0], per_layer[-1]
    encoder = model.get_mixin("eva").model
    encoder.to(device_map.vision)
    _move_inputs(encoder, device_map.vision)
    _move_output(encoder, first)                            # image embeddings join the token embeddings
    glm.word_embeddings.to(first)
    _move_inputs(glm.word_embeddings, first)
    for layer, device in zip(glm.layers, per_layer):
        layer.to(device)
        for part in (layer.input_layernorm, layer.attention):   # the two entries of ChatGLM's layer_forward
            _move_inputs(part, device)
    glm.final_layernorm.to(last)
    _move_inputs(glm.final_layernorm, last)
    head = model.get_mixin("chatglm-final")
    head.to(first)
    _move_inputs(head.lm_head, first)
    attn = model.get_mixin("chatglm-attn")
    attn.rotary_emb = RotaryPerDevice(attn.rotary_emb, sorted(set(per_layer)))
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                if str(p.device) not in device_map.devices and not n.endswith("inv_freq")]
    if leftover:   # a part this map does not know of (e.g. an adapter mixin): refuse rather than fail later
        raise DeviceMapError(f"--device-map does not place {leftover[:4]}; it supports plain VisualGLM models")
    model.device_map = device_map
    return model


def backend_for(device_map, backend: str) -> str:
    """The chat backend for a model placed by a device map: sat's own forward (the fast path keeps the
    whole model on one GPU)."""
    if not device_map:
        return backend
    if backend == "fast":
        raise DeviceMapError("--backend fast runs the whole model on one GPU; with --device-map use "
                             "--backend sat (or auto)")
    return "sat"
