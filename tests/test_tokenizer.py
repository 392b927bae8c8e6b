"""Tests for model/tokenizer.py on a tiny SentencePiece model trained here (no downloads)."""
import json
import random
import shutil

import pytest
import sentencepiece as spm

from model.tokenizer import CONFIG_FILE, VOCAB_FILE, ChatGLMTokenizer, train_tokenizer

ZH = ["这张图片的背景是什么颜色？", "这张图片的背景是蒙蒙细雨。", "描述这张图片。", "图中有一只猫在睡觉。",
      "天空是蓝色的，草地是绿色的。", "这是一座古老的城市。"]
EN = ["What is the color of the background?", "Describe the image.", "A cat is sleeping on a sofa.",
      "The sky is blue and the grass is green.", "There are two people walking in the rain."]


def corpus(seed=0, n=300):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(f"<img></img>问：{rng.choice(ZH)}\n答：{rng.choice(ZH)}")
        elif kind == 1:
            lines.append(f"Q:{rng.choice(EN)}\nA:{rng.choice(EN)}")
        elif kind == 2:
            lines.append("def f(x):\n" + " " * rng.choice([2, 4, 8]) + "return x\t# " + rng.choice(EN))
        else:
            lines.append(rng.choice(ZH) + " " + rng.choice(EN) + " [gMASK] <sop>")
    return lines


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus(), out, vocab_size=600)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    return ChatGLMTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="session")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=str(tok_dir / VOCAB_FILE))


def copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / CONFIG_FILE).read_text(encoding="utf-8"))
    cfg.update(changes)
    (dst / CONFIG_FILE).write_text(json.dumps(cfg), encoding="utf-8")
    return dst


@pytest.mark.parametrize("text", [
    "这张图片的背景是什么颜色？",
    "Describe the image.\nThe sky is blue.",
    "line1\n\nline2\tcol\t\tend",
    "a  b       c" + " " * 80 + "d" + " " * 100 + "e" + " " * 81 + "f",
    "  leading and trailing  ",
    " single leading space",
    "混合 mixed 文本 text\n答：好的。",
    "漢字ünïcødé 🙂 never seen in training",
])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)).startswith(text)


def test_whitespace_pieces(tok):
    def pieces(text):
        return tok.tokenize(text)
    assert "<n>" in pieces("a\nb") and "\n" not in "".join(pieces("a\nb"))
    assert "<|tab|>" in pieces("a\tb")
    for n in (2, 7, 80):
        assert f"<|blank_{n}|>" in pieces("a" + " " * n + "b")
    hundred = pieces("a" + " " * 100 + "b")
    i = hundred.index("<|blank_80|>")
    assert hundred[i + 1] == "<|blank_20|>"
    # 81 spaces: the longest piece plus one ordinary space ("▁" starting the next piece)
    p81 = pieces("a" + " " * 81 + "b")
    assert "<|blank_80|>" in p81 and not any(p.startswith("<|blank_") and p != "<|blank_80|>" for p in p81)
    # tokenize and encode agree
    text = "x" + " " * 7 + "y\tz\n答："
    assert tok.convert_tokens_to_ids(tok.tokenize(text)) == tok.encode(text, add_special_tokens=False)


def test_dummy_prefix(tok):
    with_prefix = tok.tokenize("hello world")
    without = tok.tokenize("hello world", add_dummy_prefix=False)
    assert with_prefix[0].startswith("▁")
    assert not without[0].startswith("▁")
    assert tok.decode(tok.encode("hello world", False, add_dummy_prefix=False)) == "hello world"
    # a newline at the very start must survive the "<n>" trick
    assert tok.decode(tok.encode("\nhi", False, add_dummy_prefix=False)) == "\nhi"


def test_special_ids_come_from_the_model(tok, sp):
    expect = {"bos_token_id": "<sop>", "eos_token_id": "<eop>", "eop_token_id": "<eop>",
              "mask_token_id": "[MASK]", "gmask_token_id": "[gMASK]", "pad_token_id": "<pad>",
              "unk_token_id": "<unk>", "end_token_id": "</s>"}
    for attr, piece in expect.items():
        assert getattr(tok, attr) == sp.piece_to_id(piece), attr
    assert (tok.unk_token_id, tok.end_token_id, tok.pad_token_id) == (0, 2, 3)  # ChatGLM's layout
    specials = [sp.piece_to_id(p) for p in
                ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]]
    assert specials == list(range(specials[0], specials[0] + 8))
    assert len(tok) == tok.vocab_size == sp.get_piece_size() == len(tok.get_vocab())
    assert tok.get_vocab()["[gMASK]"] == tok.gmask_token_id


def test_config_token_strings_are_used(tok, tok_dir, tmp_path, sp):
    other = copy_with_config(tok_dir, tmp_path / "other", gmask_token="[sMASK]", bos_token="<ENC>")
    t2 = ChatGLMTokenizer.from_pretrained(other)
    assert t2.gmask_token_id == sp.piece_to_id("[sMASK]") != tok.gmask_token_id
    assert t2.encode("hi")[-2:] == [sp.piece_to_id("[sMASK]"), sp.piece_to_id("<ENC>")]
    bad = copy_with_config(tok_dir, tmp_path / "bad", gmask_token="[NOPE]")
    with pytest.raises(ValueError, match=r"\[NOPE\]"):
        ChatGLMTokenizer.from_pretrained(bad)


def test_num_image_tokens_shift(tok, tok_dir, tmp_path):
    shifted = ChatGLMTokenizer.from_pretrained(copy_with_config(tok_dir, tmp_path / "s", num_image_tokens=100))
    text = "问：这张图片\n答：ok"
    assert shifted.encode(text) == [i + 100 for i in tok.encode(text)]
    assert shifted.gmask_token_id == tok.gmask_token_id + 100
    assert len(shifted) == len(tok) + 100
    assert shifted.decode([5, 17] + shifted.encode(text, False)) == text  # image ids carry no text


def test_missing_files(tok_dir, tmp_path):
    for name in (VOCAB_FILE, CONFIG_FILE):
        folder = tmp_path / f"no_{name}"
        shutil.copytree(tok_dir, folder)
        (folder / name).unlink()
        with pytest.raises(FileNotFoundError) as err:
            ChatGLMTokenizer.from_pretrained(folder)
        assert str(folder) in str(err.value) and name in str(err.value)


def test_build_inputs(tok):
    a, b = tok.encode("问：什么？", False), tok.encode("红色。", False)
    g, s, e = tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id
    assert tok.build_inputs_with_special_tokens(a) == a + [g, s]
    assert tok.build_inputs_with_special_tokens(a, b) == a + [g, s] + b + [e]
    assert tok.encode("问：什么？") == a + [g, s]
    assert tok("问：什么？")["input_ids"] == a + [g, s]


def test_decode_drops_pad_and_out_of_vocab(tok):
    ids = tok.encode("<img>", False) + [tok.pad_token_id] * 32 + tok.encode("</img>问：好\n答：", False)
    text = tok.decode(ids + [len(tok), len(tok) + 183])
    assert "<pad>" not in text and text.replace(" ", "") == "<img></img>问：好\n答："
    assert tok.decode([tok.pad_token_id] * 5) == ""
    full = tok.encode("好的") + tok.encode("谢谢", False) + [tok.eos_token_id]
    assert tok.decode(full, skip_special_tokens=True).replace(" ", "") == "好的谢谢"
    assert "[gMASK]" in tok.decode(full)


def test_decode_drops_configured_pad(tok, tok_dir, tmp_path):
    # Our <pad> is a SentencePiece control piece (decodes to "" anyway); a config whose pad
    # is a visible piece shows that decode really removes the pad id itself.
    t = ChatGLMTokenizer.from_pretrained(copy_with_config(tok_dir, tmp_path / "p", pad_token="<unused_0>"))
    ids = t.encode("猫", False) + [t.pad_token_id] * 3 + t.encode("狗", False)
    assert "<unused_0>" not in t.decode(ids) and t.decode(ids).replace(" ", "") == "猫狗"
    # ...while the same id is visible text for a tokenizer whose pad is <pad>
    assert "<unused_0>" in tok.decode(ids)


def test_literal_special_tokens_in_text(tok):
    ids = tok.encode("问[gMASK]答<sop>", add_special_tokens=False)
    assert tok.gmask_token_id in ids and tok.bos_token_id in ids
    assert ids.index(tok.gmask_token_id) < ids.index(tok.bos_token_id)
    assert tok.tokenize("x[gMASK]")[-1] == "[gMASK]"
    assert tok.decode(ids).replace(" ", "") == "问[gMASK]答<sop>"
    # "</s>", "<pad>", "<unk>" are control pieces SentencePiece never matches in text;
    # only the tokenizer's own split turns them into their ids
    ids = tok.encode("a</s>b<pad>c<unk>", add_special_tokens=False)
    for tid in (tok.end_token_id, tok.pad_token_id, tok.unk_token_id):
        assert ids.count(tid) == 1


def test_training_is_deterministic(tok_dir, tmp_path):
    again = tmp_path / "again"
    train_tokenizer(corpus(), again, vocab_size=600)
    assert (again / VOCAB_FILE).read_bytes() == (tok_dir / VOCAB_FILE).read_bytes()
    assert (again / CONFIG_FILE).read_bytes() == (tok_dir / CONFIG_FILE).read_bytes()
    # a different corpus gives a different model (the comparison above can fail)
    train_tokenizer(corpus(seed=1, n=200), tmp_path / "other", vocab_size=600)
    assert (tmp_path / "other" / VOCAB_FILE).read_bytes() != (tok_dir / VOCAB_FILE).read_bytes()


def test_bpe_variant(tmp_path):
    bpe = train_tokenizer(corpus(n=200), tmp_path / "bpe", vocab_size=600, model_type="bpe")
    text = "这张图片的背景是什么颜色？\n  A:   blue\t!"
    assert bpe.decode(bpe.encode(text, False)) == text
    assert bpe.pad_token_id == 3


def test_batch_call_left_pads(tok):
    torch = pytest.importorskip("torch")
    texts = ["短", "Describe the image in a long sentence.\n答："]
    plain = [tok.encode(t) for t in texts]
    batch = tok(texts, padding=True)
    width = max(map(len, plain))
    for row, ids in zip(batch.input_ids, plain):
        assert len(row) == width
        assert row[width - len(ids):] == ids and set(row[:width - len(ids)]) <= {tok.pad_token_id}
    pt = tok(texts, return_tensors="pt", padding=True).to("cpu")
    assert pt["input_ids"].dtype == torch.long and pt.input_ids.tolist() == batch["input_ids"]
    assert tok("短", return_tensors="pt").input_ids.shape == (1, len(plain[0]))
    with pytest.raises(ValueError):
        tok(texts, return_tensors="pt")


# -- streaming decoder ---------------------------------------------------------------------------------
def streams(tok, seed):
    """Growing id lists as answers look: encoded text (Chinese, English, code with blanks and tabs, emoji
    that only byte pieces spell), runs of random pieces of every kind (bytes, controls, unknown, specials),
    pads and ids past the vocabulary."""
    rng = random.Random(seed)
    texts = corpus(seed, 20) + ["漢字ünïcødé 🙂🙂 never seen", "a" + " " * 37 + "b\n\n\tc"]
    for _ in range(60):
        ids = []
        while len(ids) < rng.randrange(5, 120):
            kind = rng.randrange(4)
            if kind < 2:
                ids += tok.encode(rng.choice(texts), add_special_tokens=False)
            elif kind == 2:
                ids += [rng.randrange(tok.sp.get_piece_size()) for _ in range(rng.randrange(1, 6))]
            else:
                ids += [rng.choice([tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.vocab_size + 7])]
        yield ids


@pytest.mark.parametrize("settle, keep, lag", [(16, 4, 64), (2, 1, 8), (1, 0, 1)])
def test_streaming_decoder_equals_decoding_the_whole_list_after_every_token(tok, settle, keep, lag):
    """At every length: the same text as tok.decode of the whole list, with the kept text extended often
    (settle 1, keep 0: a join after nearly every piece) or as shipped, and its postprocessing cut moved
    as often (lag 1) or as shipped."""
    joined = cut = 0
    for ids in streams(tok, settle):
        stream = tok.streaming_decoder()
        stream.SETTLE, stream.KEEP, stream.LAG = settle, keep, lag
        for n in range(1, len(ids) + 1):
            assert stream.decode(ids[:n]) == tok.decode(ids[:n]), (ids[:n], stream._kept, stream._cut)
        joined += stream._kept > 0
        cut += stream._cut > 0
    assert joined > 30 and cut > 10       # the joins and cuts were exercised, not skipped for a full decode


def test_streaming_decoder_cost_does_not_grow_with_the_answer(tok, monkeypatch):
    """SentencePiece sees the last few pieces per call and, when the kept text is extended, only the
    pieces it adds: for a 400-piece answer, a few dozen pieces per call at most, not the whole list (n^2 / 2
    pieces) nor the kept text every SETTLE pieces."""
    rng = random.Random(1)
    ids = []
    while len(ids) < 400:
        ids += tok.encode(rng.choice(EN + ZH), add_special_tokens=False)
    ids = ids[:400]
    seen = []
    stream = tok.streaming_decoder()
    decode = tok.sp.decode
    monkeypatch.setattr(tok.sp, "decode", lambda pieces: seen.append(len(pieces)) or decode(pieces))
    for n in range(1, 401):
        stream.decode(ids[:n])
    assert sum(seen) < 20 * 400, sum(seen)
    restart = tok.streaming_decoder()                       # and a shorter list starts over, still right
    monkeypatch.undo()
    assert restart.decode(ids[:50]) == tok.decode(ids[:50]) and restart.decode(ids[:10]) == tok.decode(ids[:10])
