"""VisualGLMModel = sat's ChatGLM-6B + an image mixin.

The image mixin (named "eva", so its weights live under `mixins.eva.model.*` as in the released
checkpoint) encodes the image with BLIP-2 and writes the resulting `image_length` vectors over the
placeholder slots that follow the "<img>" tokens of the prompt:

    ids:        <img> tokens | image_length placeholders | </img>问：...\n答： | [gMASK] <sop> ...
    embeddings: E[ids]       | BLIP2(image)              | E[ids]             | E[ids]
"""
import warnings

import torch

from sat.model.base_model import BaseMixin
from sat.model.official.chatglm_model import ChatGLMModel

from ..configs import add_visualglm_args
from .blip2 import BLIP2


class ImageMixin(BaseMixin):
    def __init__(self, args, params_dtype=torch.float32):
        super().__init__()
        self.image_length = args.image_length
        self.model = BLIP2(args.eva_args, args.qformer_args, args.hidden_size, args.image_length,
                           params_dtype=params_dtype, skip_init=getattr(args, "skip_init", False))

    def word_embedding_forward(self, input_ids, output_cross_layer, image=None, image_embeds=None,
                               pre_image=0, **kw_args):
        """input_ids [B, S]; image [B, 3, H, W] pixels or image_embeds [B, L, hidden] (already encoded);
        pre_image: int or LongTensor [B] = index of the first placeholder (negative: row has no image).
        Without an image (or on cached decode steps, where S is 1) this is a plain embedding lookup."""
        embeds = self.transformer.word_embeddings(input_ids)  # [B, S, hidden]
        if image_embeds is None and image is not None:
            image_embeds = self.model(image.to(embeds.dtype))
        if image_embeds is None or input_ids.shape[1] < self.image_length:
            return embeds
        batch = input_ids.shape[0]
        starts = torch.as_tensor(pre_image, device=input_ids.device).expand(batch)
        image_embeds = image_embeds.to(embeds.dtype).expand(batch, -1, -1)
        rows = []
        for b in range(batch):  # rows may start their image at different offsets (left padding)
            s = int(starts[b])
            if s < 0:
                rows.append(embeds[b])
            else:
                rows.append(torch.cat([embeds[b, :s], image_embeds[b], embeds[b, s + self.image_length:]]))
        return torch.stack(rows)


class VisualGLMModel(ChatGLMModel):
    def __init__(self, args, transformer=None, params_dtype=torch.float32, **kwargs):
        super().__init__(args, transformer=transformer, params_dtype=params_dtype, **kwargs)
        self.image_length = args.image_length
        self.add_mixin("eva", ImageMixin(args, params_dtype=params_dtype))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> image embeddings [B, image_length, hidden] in the GLM's dtype."""
        dtype = self.transformer.word_embeddings.weight.dtype
        return self.get_mixin("eva").model(image.to(dtype))

    @property
    def image_size(self) -> tuple:
        return self.get_mixin("eva").model.image_size

    @classmethod
    def add_model_specific_args(cls, parser):
        add_visualglm_args(parser)
        return super().add_model_specific_args(parser)

    @classmethod
    def from_pretrained(cls, name, args=None, *, device=None, dtype=None, **kwargs):
        """sat-style entry point returning (model, args), as upstream code calls it:
            VisualGLMModel.from_pretrained("visualglm-6b", args=argparse.Namespace(fp16=True, skip_init=True))
        The dtype follows args.fp16 / args.bf16 and the device args.device (CPU by default) unless given
        here. The returned args are the model's full set with the caller's values laid over them, so
        sat's save_checkpoint(iteration, model, None, None, args) writes a loadable folder.
        See model/sat/checkpoint.py for what is checked while loading."""
        from .checkpoint import load_model
        given = vars(args) if args is not None else {}
        dtype = dtype or (torch.float16 if given.get("fp16") else torch.bfloat16 if given.get("bf16") else None)
        device = device or _usable_device(given.get("device") or "cpu")
        model = load_model(name, device=device, dtype=dtype, expected_class=cls, **kwargs)
        for key, value in given.items():
            setattr(model.args, key, value)
        model.args.device = device
        return model, model.args


def _usable_device(device) -> str:
    """Upstream snippets ask for device="cuda"; on a machine without CUDA they still run, on the CPU."""
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device={device!r} was asked for but CUDA is not available: loading on the CPU.")
        return "cpu"
    return device
