"""model.quantize(bits) of the Hugging Face flavour (spec 7.2): weight-only int8 / int4 of the GLM
block linears (query_key_value, dense, dense_h_to_4h, dense_4h_to_h of every layer), as upstream's HF
ChatGLM does; embeddings, lm_head and the image encoder stay float. The numerics are model/quant.py's
(per output row, symmetric); keys become `weight` (int8, two int4 values per byte) + `weight_scale`."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import dequantize, quantize_weight

GLM_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


class QuantizedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__()
        q, scale = quantize_weight(linear.weight.data, bits)          # [out, in] or [out, in/2] int8, [out]
        self.bits, self.in_features, self.out_features = bits, linear.in_features, linear.out_features
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x):                                               # [..., in] -> [..., out]
        return F.linear(x, dequantize(self.weight, self.weight_scale, self.bits, x.dtype), self.bias)


@torch.no_grad()
def quantize_glm(model, bits: int):
    """Replace the GLM block linears of a VisualGLMForConditionalGeneration in place; returns the model."""
    for layer in model.transformer.layers:
        for path in GLM_LINEARS:
            owner_name, name = path.split(".")
            owner = getattr(layer, owner_name)
            linear = getattr(owner, name)
            if isinstance(linear, nn.Linear):
                setattr(owner, name, QuantizedLinear(linear, bits))
    model.config.quantization_bit = bits
    return model
