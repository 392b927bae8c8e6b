"""transformers' own generate() on VisualGLMForConditionalGeneration (GenerationMixin, 2-D GLM positions, the
prefix mask, the image at the first step only, a DynamicCache) against the chat core's greedy decoding loop
(model/generation.py over HFBackend), which builds its positions and masks independently
(model/positions.py). A tiny random model built without sat; CUDA cases run where a GPU is present."""
import copy

import pytest
import torch

from conftest import make_tiny_config, randomize
from model.chat import ChatEngine
from model.convert import sat_config_to_hf
from model.hf import HFBackend, VisualGLMConfig, VisualGLMForConditionalGeneration
from model.sampling import SamplingParams

NEW = 40
GREEDY = dict(top_k=1, repetition_penalty=1.0)          # transformers' penalty also counts the prompt: leave it out
CASES = [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cuda", torch.float16), ("cuda", torch.bfloat16)]


@pytest.fixture(scope="module")
def model(tokenizer):
    config = VisualGLMConfig(**sat_config_to_hf(make_tiny_config(tokenizer), tokenizer.eos_token_id))
    return randomize(VisualGLMForConditionalGeneration(config), seed=3).eval()


def on(model, device, dtype):
    """A copy of the model on device in dtype (the fixture stays fp32 on the CPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return copy.deepcopy(model).to(device, dtype)


def core_tokens(model, tokenizer, requests):
    """Per request, the greedy tokens of the chat core's decoding loop (eos not included)."""
    rows = [[] for _ in requests]
    for step in ChatEngine(HFBackend(model), tokenizer).generate(requests):
        for row, token in zip(rows, step):
            if token is not None:
                row.append(token)
    return rows


def request(model, tokenizer, image_file, query, image: bool, new=NEW):
    engine = ChatEngine(HFBackend(model), tokenizer)
    embeds = engine.encode_image(str(image_file)) if image else None
    return engine.make_request(query, image_embeds=embeds, params=SamplingParams(max_new_tokens=new, **GREEDY))


def answer(out, prompt_length, eos):
    tokens = out[prompt_length:].tolist()
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("image", [False, True])
def test_generate_with_and_without_cache_equals_the_chat_core(model, tokenizer, image_file, image):
    req = request(model, tokenizer, image_file, "描述这张图片。", image)
    inputs = model.build_inputs_with_image(tokenizer, str(image_file) if image else "", "描述这张图片。")
    assert inputs["input_ids"][0].tolist() == req.ids and inputs.get("pre_image_length", -1) == req.pre_image
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, use_cache=False)
    expected = core_tokens(model, tokenizer, [req])[0]
    assert len(expected) >= 32
    assert answer(cached[0], len(req.ids), tokenizer.eos_token_id) == expected
    assert torch.equal(cached, uncached)
    # upstream's chat() on the same model says the same thing
    response, _ = model.chat(tokenizer, str(image_file) if image else "", "描述这张图片。", do_sample=False,
                             max_new_tokens=NEW, repetition_penalty=1.0)
    assert response == ChatEngine(HFBackend(model), tokenizer).decode(expected)


def test_generate_a_left_padded_batch_with_and_without_an_image(model, tokenizer, image_file):
    reqs = [request(model, tokenizer, image_file, "描述这张图片。", True, new=12),
            request(model, tokenizer, image_file, "你好，请问你是谁？", False, new=12)]
    width = max(len(r.ids) for r in reqs)
    pads = [width - len(r.ids) for r in reqs]
    ids = torch.tensor([[tokenizer.pad_token_id] * p + r.ids for p, r in zip(pads, reqs)])
    mask = torch.tensor([[0] * p + [1] * len(r.ids) for p, r in zip(pads, reqs)])
    pixels = ChatEngine(HFBackend(model), tokenizer).pixels(str(image_file))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, pixel_values=pixels.expand(2, -1, -1, -1),
                             pre_image_length=torch.tensor([reqs[0].pre_image, -1]), max_new_tokens=12, do_sample=False)
    got = [answer(row, width, tokenizer.eos_token_id) for row in out]
    assert got == core_tokens(model, tokenizer, reqs) and all(got)


@pytest.mark.parametrize("device,dtype", CASES[1:], ids=lambda v: str(v).removeprefix("torch."))
def test_generate_in_half_precision_follows_the_chat_core(model, tokenizer, image_file, device, dtype):
    """Both paths run the same kernels in the same order, so even in fp16 / bf16 the tokens agree."""
    m = on(model, device, dtype)
    req = request(m, tokenizer, image_file, "描述这张图片。", True)
    inputs = m.build_inputs_with_image(tokenizer, str(image_file), "描述这张图片。")
    with torch.no_grad():
        out = m.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        first = m(**inputs, use_cache=False).logits[0, -1].float().cpu()
        exact = model(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()}).logits[0, -1]
    assert answer(out[0].cpu(), len(req.ids), tokenizer.eos_token_id) == core_tokens(m, tokenizer, [req])[0]
    # the half-precision forward is the fp32 one up to rounding: bf16 keeps 8 bits of mantissa, so over a
    # few layers of random weights the logits move by a few percent of their range, not more
    assert (first - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("device,bits", [("cpu", 8), ("cpu", 4), ("cuda", 8), ("cuda", 4)], ids=str)
def test_generate_on_a_quantized_model_follows_the_chat_core(model, tokenizer, image_file, device, bits):
    m = on(model, device, torch.float16 if device == "cuda" else torch.float32).quantize(bits)
    req = request(m, tokenizer, image_file, "描述这张图片。", True)
    inputs = m.build_inputs_with_image(tokenizer, str(image_file), "描述这张图片。")
    with torch.no_grad():
        out = m.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    assert answer(out[0].cpu(), len(req.ids), tokenizer.eos_token_id) == core_tokens(m, tokenizer, [req])[0]
