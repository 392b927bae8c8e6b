"""What a second turn can reuse on the fast path: not the prompt's keys/values (GLM's prompt attention is
bidirectional, so appending turn 2 changes turn 1's), but the image embeddings, encoded once."""
import torch

from model.chat import ChatEngine
from model.fast import FastBackend
from model.positions import batch_inputs


def prompt_keys(backend, ids):
    """Keys of every layer [L, nh, S, hd] after prefilling `ids` alone (text only)."""
    args = batch_inputs([ids], 3, dtype=torch.bool)[:3]
    _, cache = backend.prefill(*args, capacity=len(ids) + 8)
    return torch.stack([k[0, :, :len(ids)].clone() for k in cache.k])


def test_appending_a_turn_changes_the_keys_of_the_earlier_prompt(tiny):
    model, tok = tiny
    engine = ChatEngine(FastBackend(model), tok)
    first = engine.make_request("描述这张图片。", [], has_image=False).ids
    second = engine.make_request("背景是什么颜色？", [("描述这张图片。", "图中有一个红色的圆形。")], has_image=False).ids
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= 5                                       # a real common prefix: "问：描述这张图片。..."
    k1, k2 = prompt_keys(engine.backend, first), prompt_keys(engine.backend, second)
    # layer 0 reads only each token's own embedding and position: the prefix's keys agree there ...
    assert torch.allclose(k1[0, :, :shared], k2[0, :, :shared], atol=1e-5)
    # ... from layer 1 on they have attended to the whole prompt, turn 2's question included
    assert (k1[1:, :, :shared] - k2[1:, :, :shared]).abs().amax() > 1e-2


def test_a_second_turn_with_the_same_image_does_not_encode_it_again(tiny, image_file, monkeypatch):
    model, tok = tiny
    backend = FastBackend(model)
    calls = []
    encode = backend.encode_image
    monkeypatch.setattr(backend, "encode_image", lambda pixels: calls.append(len(pixels)) or encode(pixels))
    engine = ChatEngine(backend, tok)
    greedy = dict(top_k=1, max_length=400, max_new_tokens=8)
    _, history, image = engine.chat(str(image_file), "描述这张图片。", **greedy)
    engine.chat(str(image_file), "背景是什么颜色？", history=history, **greedy)     # the same file again (a server)
    engine.chat(None, "图片里有几个形状？", history=history, image=image, **greedy)   # its embeddings (chat())
    assert calls == [1]
    assert engine.images.stats == dict(images_encoded=1, image_cache_hits=1)
