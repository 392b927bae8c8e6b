"""The chat engine: prompt formats, history, text-only turns, streaming, image reuse, errors."""
import pytest
import torch

from model.chat import ChatEngine, chat, stream_chat
from model.prompts import (PromptTooLongError, ResponseStream, build_prompt, encode_prompt, has_chinese,
                           process_response)
from model.image import ImageLoadError

GREEDY = dict(top_k=1, max_length=400, repetition_penalty=1.3)


def test_prompt_formats():
    hist = [("q1", "a1")]
    assert build_prompt("q2", hist) == "<img></img>问：q1\n答：a1\n问：q2\n答："
    assert build_prompt("q2", hist, english=True) == "<img></img>Q:q1\nA:a1\nQ:q2\nA:"
    assert build_prompt("hi", None, image=False) == "问：hi\n答："


def test_encode_prompt_splits_around_image_slots(tokenizer):
    ids, pre = encode_prompt(tokenizer, build_prompt("描述这张图片。"), image_length=32)
    head = tokenizer.encode("<img>", add_special_tokens=False)
    tail = tokenizer.encode("</img>问：描述这张图片。\n答：", add_special_tokens=False)
    assert pre == len(head)
    assert ids == head + [tokenizer.pad_token_id] * 32 + tail + [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    text_ids, pre = encode_prompt(tokenizer, build_prompt("hi", image=False))
    assert pre == -1 and text_ids[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]


def test_process_response_equals_one_pass_per_mark_and_side_on_random_text():
    """The compiled, skip-absent-marks process_response against the plain definition: for each mark in
    turn, full-width after a Chinese character, then before one."""
    import random
    import re

    from model.prompts import FULL_WIDTH, PLACEHOLDERS

    def plain(text):
        text = text.strip()
        for placeholder, value in PLACEHOLDERS.items():
            text = text.replace(placeholder, value)
        for half, full in FULL_WIDTH.items():
            text = re.sub("([\u4e00-\u9fff])" + re.escape(half), lambda m: m.group(1) + full, text)
            text = re.sub(re.escape(half) + "([\u4e00-\u9fff])", lambda m: full + m.group(1), text)
        return text

    rng = random.Random(0)
    pieces = list(",!:;?，。a 中文[]训练时间2\n") + ["[[训练时间]]"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 24)))
        assert process_response(text) == plain(text), text


def test_process_response():
    assert process_response(" 你好,世界!ok, fine? [[训练时间]] ") == "你好，世界！ok, fine? 2023年"
    assert process_response("a:b") == "a:b" and process_response("是:") == "是："
    assert has_chinese("图") and not has_chinese("image")


@pytest.mark.parametrize("lag", [1, 3, 64])
def test_response_stream_equals_process_response_at_every_length(lag, monkeypatch):
    """ResponseStream (the streamed answer's post-processing) against process_response of the whole text,
    after every character of random texts dense in marks, Chinese, blanks and placeholders; with a short
    LAG the cut moves after nearly every character. And its work per call does not grow with the text."""
    import random

    from model import prompts
    rng = random.Random(lag)
    pieces = list(",!:;?，。a 中文[]训练时间2\n\t") + ["[[训练时间]]", "  ", "\ufffd"]
    cuts = 0
    for _ in range(150):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 300)))
        stream = ResponseStream()
        stream.LAG = lag
        for n in range(len(text) + 1):
            assert stream(text[:n]) == process_response(text[:n]), (text[:n], stream._source)
        cuts += bool(stream._source)
    assert cuts > 90
    seen = []
    real = prompts._process
    monkeypatch.setattr(prompts, "_process", lambda text, **kw: seen.append(len(text)) or real(text, **kw))
    stream, text = ResponseStream(), "中文,answer! " * 400                # 5,200 characters
    for n in range(len(text) + 1):
        stream(text[:n])
    assert sum(seen) < 3 * ResponseStream.LAG * len(text)                  # not n^2 / 2
    assert stream(text[:100]) == process_response(text[:100])              # another text starts over


def test_two_turns_with_history_and_image_reuse(tiny, image_file, monkeypatch):
    model, tok = tiny
    calls = []
    original = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda x: calls.append(1) or original(x))
    r1, h1, img = chat(str(image_file), model, tok, "描述这张图片。", **dict(GREEDY, max_length=110))
    assert h1 == [("描述这张图片。", r1)] and img.dim() == 3
    r2, h2, img2 = chat(None, model, tok, "背景是什么颜色？", history=h1, image=img, **GREEDY)
    assert h2 == [("描述这张图片。", r1), ("背景是什么颜色？", r2)]
    assert len(calls) == 1 and img2 is img               # encoded once for the conversation
    # a second turn really sees the first: same question without history answers differently or equally,
    # but the prompt must contain the first turn
    engine = ChatEngine(model, tok)
    req = engine.make_request("背景是什么颜色？", h1, img, False, engine_params())
    assert tok.decode(req.ids).count("描述这张图片") == 1


def engine_params():
    from model.sampling import SamplingParams
    return SamplingParams(**GREEDY)


def test_text_only_and_english(tiny):
    model, tok = tiny
    r, h, img = chat(None, model, tok, "Hello, who are you?", english=True, **GREEDY)
    assert img is None and h == [("Hello, who are you?", r)]
    r_zh, _, _ = chat("", model, tok, "Hello, who are you?", english=False, **GREEDY)
    assert isinstance(r_zh, str)


def test_english_and_chinese_prompts_differ_in_tokens(tiny):
    model, tok = tiny
    engine = ChatEngine(model, tok)
    zh = engine.make_request("hi", [], None, False, engine_params()).ids
    en = engine.make_request("hi", [], None, True, engine_params()).ids
    assert zh != en and "Q:" in tok.decode(en)


def test_streaming_matches_chat_with_same_seed(tiny, image_file):
    model, tok = tiny
    sampling = dict(top_k=20, top_p=0.9, temperature=1.0, max_length=150)
    final, _, _ = chat(str(image_file), model, tok, "描述这张图片。", generator=torch.Generator().manual_seed(3), **sampling)
    steps = [r for r, _, _ in stream_chat(str(image_file), model, tok, "描述这张图片。",
                                          generator=torch.Generator().manual_seed(3), **sampling)]
    assert len(steps) > 3 and steps[-1] == final
    assert all(len(a) <= len(b) + 1 for a, b in zip(steps, steps[1:]))  # grows (modulo punctuation rewrite)
    other, _, _ = chat(str(image_file), model, tok, "描述这张图片。", generator=torch.Generator().manual_seed(4), **sampling)
    assert other != final  # the seed matters: sampling is really on


def test_prompt_too_long(tiny):
    model, tok = tiny
    with pytest.raises(PromptTooLongError, match="max_length"):
        chat(None, model, tok, "描述这张图片。" * 50, max_length=30)


def test_bad_images_are_clear_errors(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ImageLoadError, match="not found"):
        chat(str(tmp_path / "nope.png"), model, tok, "hi")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match="not a readable image"):
        chat(str(bad), model, tok, "hi")


def test_server_engine_refuses_paths_and_urls(tiny, image_file):
    model, tok = tiny
    engine = ChatEngine(model, tok, allow_image_paths=False, allow_image_urls=False)
    with pytest.raises(ImageLoadError, match="disabled"):
        engine.encode_image(str(image_file))
    with pytest.raises(ImageLoadError, match="disabled"):
        engine.encode_image("http://127.0.0.1:9/x.png")
    assert engine.encode_image(image_file.read_bytes()).dim() == 3


def test_a_streamed_answer_never_shows_half_a_character(tiny):
    """An emoji spelled by byte pieces: while its bytes come in, the raw decode ends in U+FFFD, but no
    unfinished answer (whole or streamed decode) shows it; the finished one has the emoji."""
    model, tok = tiny
    engine = ChatEngine(model, tok)
    ids = tok.encode("好🙂好", add_special_tokens=False)
    lengths = range(1, len(ids) + 1)
    assert any(tok.decode(ids[:n]).endswith("\ufffd") for n in lengths)
    decode = engine.streaming_decode()
    for n in lengths:
        assert "\ufffd" not in engine.decode(ids[:n], final=False)
        assert "\ufffd" not in decode(ids[:n], final=False)
    assert decode(ids) == engine.decode(ids) == "好🙂好"


def test_streaming_decode_equals_decode_at_every_length(tiny):
    """engine.streaming_decode() (the server's and stream_chat's) against engine.decode, unfinished and
    final, at every length of an id list mixing answers' pieces; a tokenizer without a streaming decoder
    gets decode itself."""
    import random

    model, tok = tiny
    engine = ChatEngine(model, tok)
    rng = random.Random(0)
    text = "描述这张图片。The sky is blue,天空是蓝色的! 🙂  two  spaces\nnew line"
    words = tok.encode(text, add_special_tokens=False)
    ids = [rng.choice(words + [rng.randrange(tok.vocab_size)]) for _ in range(150)]
    decode = engine.streaming_decode()
    for n in range(1, len(ids) + 1):
        assert decode(ids[:n], final=False) == engine.decode(ids[:n], final=False)
    assert decode(ids) == engine.decode(ids)

    class Plain:                                   # a tokenizer with decode only
        def __getattr__(self, name):
            if name == "streaming_decoder":
                raise AttributeError(name)
            return getattr(tok, name)
    plain = ChatEngine(model, Plain())
    assert plain.streaming_decode() == plain.decode
