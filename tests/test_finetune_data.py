"""Fine-tune data: tokens and label masking (spec 8.4), formats, image lookup, malformed entries,
batch order and the learning-rate schedule of the trainer (training/). No training here."""
import json
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from training.batches import BatchOrder, collate
from training.data import IGNORE, DataError, VisualGLMDataset, encode_sample, split_entries
from training.distributed import deepspeed_config
from training.objective import learning_rate, lm_loss
from model.prompts import build_prompt

COLOURS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色")]


def make_dataset(folder: Path, n: int = 4, name: str = "dataset.json", img_prefix: str = "") -> Path:
    """n coloured-circle PNGs in folder/img/ and a dataset file in the original format."""
    from PIL import Image, ImageDraw
    (folder / "img").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        en, zh = COLOURS[i % len(COLOURS)]
        img = Image.new("RGB", (48, 48), "white")
        ImageDraw.Draw(img).ellipse([8, 8, 40, 40], fill=en)
        img.save(folder / "img" / f"{i}.png")
        items.append({"img": f"{img_prefix}img/{i}.png", "prompt": "图中有什么？", "label": f"图中有一个{zh}的圆形。"})
    path = folder / name
    path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return path


def dataset(tokenizer, files=None, entries=None, msl=64, mtl=32, **kw):
    return VisualGLMDataset(files, tokenizer, image_size=(224, 224), image_length=32, max_source_length=msl,
                            max_target_length=mtl, entries=entries, **kw)


# ----------------------------------------------------------------------------------------------
# tokens and labels

def test_label_masking_on_a_known_example(tokenizer):
    prompt = build_prompt("图中有什么？")                     # <img></img>问：图中有什么？\n答：
    ids, labels, ctx, pre_image, cut = encode_sample(tokenizer, prompt, "一个红色的圆形。", True, 32, 64, 32)
    head = tokenizer.encode("<img>", add_special_tokens=False)
    tail = tokenizer.encode("</img>问：图中有什么？\n答：", add_special_tokens=False)
    answer = tokenizer.encode("一个红色的圆形。", add_special_tokens=False)
    g, sop, eop = tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eop_token_id
    assert ids == head + [tokenizer.pad_token_id] * 32 + tail + [g, sop] + answer + [eop]
    assert not cut and pre_image == len(head) and ctx == ids.index(sop)
    # labels: nothing before <sop>; <sop>, the answer and <eop> themselves
    assert labels == [IGNORE] * ctx + [sop] + answer + [eop]

    # after the shift, the supervised predictions are made at [gMASK] ... last answer token
    batch = collate([{"input_ids": ids, "labels": labels, "context_length": ctx, "pre_image": pre_image,
                      "image": None}], tokenizer.pad_token_id)
    targets = batch["labels"][0, 1:]
    predicted_at = [i for i in range(len(ids) - 1) if targets[i] != IGNORE]
    assert predicted_at == list(range(ctx - 1, len(ids) - 1))
    assert [ids[i] for i in predicted_at[:1]] == [g]
    assert targets[targets != IGNORE].tolist() == [sop] + answer + [eop]


def test_loss_counts_only_supervised_tokens():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE]])
    logits = torch.zeros(1, 5, 10)
    logits[0, 1, 5] = 50.0                      # predicts label[2] perfectly
    logits[0, 2, 6] = 50.0                      # predicts label[3] perfectly
    logits[0, 3] = torch.randn(10) * 9          # would cost a lot if label[4] counted
    assert lm_loss(logits, labels).item() < 1e-6
    logits[0, 2, 6] = 0.0
    assert lm_loss(logits, labels).item() == pytest.approx(math.log(10) / 2, rel=1e-4)


def test_truncation_keeps_the_original_limits(tokenizer):
    prompt = build_prompt("图中有什么？" * 20)
    label = "图中有一个红色的圆形。" * 20
    ids, labels, ctx, _, cut = encode_sample(tokenizer, prompt, label, True, 32, 48, 16)
    assert cut
    assert ctx == 48                          # a is cut to max_source_length - 1, then [gMASK] <sop>
    assert len(ids) == 48 + 16                # b is cut to max_target_length - 2, then <eop>
    assert ids[ctx - 1:ctx + 1] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert ids[-1] == tokenizer.eop_token_id


def test_text_only_entry_and_right_padding(tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"img": None, "prompt": "你好", "label": "你好。"},
                                {"img": None, "prompt": "描述这张图片。", "label": "有两个形状。图中有一个红色的圆形。"}],
                               ensure_ascii=False), encoding="utf-8")
    ds = dataset(tokenizer, [path])
    rows = [ds[0], ds[1]]
    assert rows[0]["image"] is None and rows[0]["pre_image"] == -1
    assert rows[0]["input_ids"] == tokenizer.encode(build_prompt("你好", image=False)) + \
        tokenizer.encode("你好。", add_special_tokens=False) + [tokenizer.eop_token_id]
    batch = collate(rows, tokenizer.pad_token_id)
    assert "image" not in batch and batch["pre_image"].tolist() == [-1, -1]
    short = len(rows[0]["input_ids"])
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, short:] == IGNORE).all()
    # positions: 0..ctx-1 in the context, the [gMASK] index from <sop> on; block ids 1, 2, ... from <sop>
    ctx = rows[1]["context_length"]
    pos = batch["position_ids"][1]
    assert pos[0, :ctx].tolist() == list(range(ctx)) and (pos[0, ctx:] == ctx - 1).all()
    assert (pos[1, :ctx] == 0).all() and pos[1, ctx:ctx + 3].tolist() == [1, 2, 3]
    mask = batch["attention_mask"][1, 0]
    assert mask[0, ctx - 1] == 1 and mask[0, ctx] == 0 and mask[ctx + 2, ctx + 1] == 1


# ----------------------------------------------------------------------------------------------
# formats

def test_multi_turn_conversations_become_one_sample_per_answer(tokenizer, tmp_path):
    make_dataset(tmp_path, 1)
    turns = [{"prompt": "图中有什么？", "label": "图中有一个红色的圆形。"}, {"prompt": "有几个形状？", "label": "有两个形状。"}]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps([{"img": "img/0.png", "conversations": turns}], ensure_ascii=False), encoding="utf-8")
    ds = dataset(tokenizer, [path], msl=96)
    assert len(ds) == 2
    second = ds.samples[1]
    prompt = build_prompt("有几个形状？", [("图中有什么？", "图中有一个红色的圆形。")])
    expected, _, _, _, _ = encode_sample(tokenizer, prompt, "有两个形状。", True, 32, 96, 32)
    assert second.input_ids == expected
    assert "图中有一个红色的圆形" in tokenizer.decode(second.input_ids[:second.context_length])

    # the same conversation as role/content messages, in JSON Lines
    messages = [{"role": "user", "content": "图中有什么？"}, {"role": "assistant", "content": "图中有一个红色的圆形。"},
                {"role": "user", "content": "有几个形状？"}, {"role": "assistant", "content": "有两个形状。"}]
    jsonl = tmp_path / "conv.jsonl"
    jsonl.write_text(json.dumps({"img": "img/0.png", "conversations": messages}, ensure_ascii=False) + "\n\n",
                     encoding="utf-8")
    assert [s.input_ids for s in dataset(tokenizer, [jsonl], msl=96).samples] == [s.input_ids for s in ds.samples]


def test_english_entries_use_the_english_template(tokenizer, tmp_path):
    make_dataset(tmp_path, 1)
    path = tmp_path / "en.json"
    path.write_text(json.dumps([{"img": "img/0.png", "prompt": "Describe the image.", "label": "A red circle.",
                                 "lang": "en"}]), encoding="utf-8")
    sample = dataset(tokenizer, [path]).samples[0]
    expected, _, _, _, _ = encode_sample(tokenizer, build_prompt("Describe the image.", english=True),
                                         "A red circle.", True, 32, 64, 32)
    assert sample.input_ids == expected


def test_images_are_found_relative_to_the_dataset_file(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                          # not where the data is
    data = tmp_path / "deep" / "set"
    path = make_dataset(data, 2)                         # "img": "img/0.png" next to the file
    ds = dataset(tokenizer, [path])
    assert ds.samples[0].image == data / "img" / "0.png"
    assert ds[0]["image"].shape == (3, 224, 224)
    # the original layout: "img": "fewshot-data/0.png" relative to the folder holding fewshot-data/
    from PIL import Image
    few = tmp_path / "elsewhere" / "fewshot-data"
    few.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(few / "0.png")
    orig = _write(few, [{"img": "fewshot-data/0.png", "prompt": "图中有什么？", "label": "红色。"}], "dataset.json")
    assert dataset(tokenizer, [orig]).samples[0].image == few / "0.png"


# ----------------------------------------------------------------------------------------------
# malformed datasets: the message names the file and the entry

def _write(tmp_path, items, name="bad.json"):
    path = tmp_path / name
    path.write_text(items if isinstance(items, str) else json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("items, message", [
    ([{"img": "img/0.png", "prompt": "q", "label": "a"}, {"img": "img/1.png", "prompt": "q"}],
     r"bad\.json\[1\]: missing field 'label'"),
    ([{"prompt": "q", "label": "a"}], r"bad\.json\[0\]: missing field 'img'"),
    ([{"img": "img/0.png", "prompt": "q", "label": "a"}, {"img": "img/nope.png", "prompt": "q", "label": "a"}],
     r"bad\.json\[1\]: image 'img/nope\.png' not found"),
    ([{"img": "notes.txt", "prompt": "q", "label": "a"}], r"bad\.json\[0\]: image .*notes\.txt is not a readable image"),
    ([{"img": "img/0.png", "prompt": "q", "label": 3}], r"bad\.json\[0\]: field 'label' must be a string"),
    ([{"img": "img/0.png", "conversations": []}], r"bad\.json\[0\]: 'conversations' must be a non-empty list"),
    (["just text"], r"bad\.json\[0\]: an entry must be a JSON object"),
    ([], r"bad\.json contains no entries"),
    ("[{\"img\": 1,}]", r"bad\.json is not valid JSON"),
])
def test_malformed_datasets_name_the_entry(tokenizer, tmp_path, items, message):
    make_dataset(tmp_path, 2)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=message):
        dataset(tokenizer, [_write(tmp_path, items)])


def test_malformed_json_lines_name_the_line(tokenizer, tmp_path):
    make_dataset(tmp_path, 1)
    good = json.dumps({"img": "img/0.png", "prompt": "q", "label": "a"})
    with pytest.raises(DataError, match=r"bad\.jsonl:3: missing field 'prompt'"):
        dataset(tokenizer, [_write(tmp_path, f"{good}\n{good}\n" + json.dumps({"img": "img/0.png", "label": "a"}),
                                   name="bad.jsonl")])


def test_image_unreadable_at_load_time_names_the_entry(tokenizer, tmp_path):
    path = make_dataset(tmp_path, 2)
    ds = dataset(tokenizer, [path])
    (tmp_path / "img" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"dataset\.json\[1\]"):
        ds[1]


def test_source_too_short_for_the_image_tokens(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="max_source_length 30 leaves no room"):
        dataset(tokenizer, [make_dataset(tmp_path, 1)], msl=30)


# ----------------------------------------------------------------------------------------------
# batch order, split, schedule, DeepSpeed config

def test_batch_order_is_reproducible_and_splits_ranks():
    a = [BatchOrder(10, 2, world=2, rank=r, seed=7) for r in range(2)]
    first = [i for step in range(5) for o in a for i in o.batch(step)]  # global order: step, then rank
    # each epoch gives every sample once, across both ranks
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]          # reshuffled per epoch
    again = BatchOrder(10, 2, world=2, rank=1, seed=7)
    assert [again.batch(s) for s in (4, 1)] == [a[1].batch(4), a[1].batch(1)]


def test_split_is_deterministic_and_complete():
    entries = list(range(20))
    train, valid, test = split_entries(entries, "8,2,0", seed=1)
    assert (len(train), len(valid), len(test)) == (16, 4, 0)
    assert sorted(train + valid) == entries
    assert split_entries(entries, "8,2,0", seed=1) == [train, valid, test]
    assert split_entries(entries, "1", seed=1) == [entries, [], []]


def test_learning_rate_schedule():
    args = Namespace(lr=1e-3, lr_decay_iters=None, train_iters=100, warmup=0.1, lr_decay_style="cosine",
                     lr_decay_ratio=0.1)
    assert learning_rate(args, 0) == pytest.approx(1e-4)          # step 1 of a 10-step warm-up
    assert learning_rate(args, 9) == pytest.approx(1e-3)
    assert learning_rate(args, 54) == pytest.approx(0.55e-3)      # half-way through the cosine
    assert learning_rate(args, 99) == pytest.approx(1e-4)         # lr * lr_decay_ratio at the end
    args.lr_decay_style = "linear"
    assert learning_rate(args, 54) == pytest.approx(0.55e-3)
    args.lr_decay_style, args.warmup = "constant", 0.0
    assert learning_rate(args, 0) == learning_rate(args, 99) == 1e-3


def test_deepspeed_config_from_flags(tmp_path):
    args = Namespace(deepspeed_config=None, batch_size=1, gradient_accumulation_steps=4, gradient_clipping=0.1,
                     zero_stage=1, lr=1e-4, weight_decay=0.01, fp16=True, bf16=False)
    cfg = deepspeed_config(args, world=2)
    assert cfg["train_batch_size"] == 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["fp16"]["enabled"] and "bf16" not in cfg
    assert cfg["optimizer"]["params"]["torch_adam"] is True and cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]
    base = tmp_path / "ds.json"
    base.write_text(json.dumps({"bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"eps": 1e-6}},
                                "zero_optimization": {"stage": 2, "overlap_comm": True}}))
    args.deepspeed_config, args.fp16 = str(base), False
    cfg = deepspeed_config(args, world=1)
    assert cfg["bf16"]["enabled"] is False and cfg["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["eps"] == 1e-6
    assert cfg["optimizer"]["params"]["lr"] == 1e-4


# ----------------------------------------------------------------------------------------------
# generated data (--train-data synthetic:<samples>[:<seed>])

def test_generated_samples_are_the_stream_entries_tokenized_like_files(tmp_path):
    from training.data import GeneratedDataset
    from model.image import preprocess
    from model.sat.loading import load_tokenizer
    from synthetic.stream import generated_entry
    tok = load_tokenizer(Path(__file__).resolve().parent.parent / "pretrained" / "visualglm-tiny")
    ds = GeneratedDataset("synthetic:40:5", tok, image_size=(224, 224), image_length=32, max_source_length=192,
                          max_target_length=64)
    assert len(ds) == 40
    seen_history = False
    for index in range(40):
        row = ds[index]
        entry, image = generated_entry(index, 5)
        turns = entry.get("conversations", [entry])
        t = index % len(turns)       # a conversation contributes the answer its index picks
        history = [(x["prompt"], x["label"]) for x in turns[:t]]
        seen_history |= bool(history)
        prompt = build_prompt(turns[t]["prompt"], history, english=entry["lang"] == "en", image=True)
        expected, labels, ctx, pre, _ = encode_sample(tok, prompt, turns[t]["label"], True, 32, 192, 64)
        assert row["input_ids"] == expected and row["labels"] == labels and row["context_length"] == ctx
        # uint8 pixels; normalised, they are what the chat engine feeds the model for the same image
        assert row["image"].dtype == torch.uint8 and row["image"].shape == (3, 224, 224)
        from model.image import normalize
        assert torch.allclose(normalize(row["image"]), preprocess(image, 224)[0])
    assert seen_history


@pytest.mark.parametrize("spec", ["synthetic:zero", "synthetic:0", "synthetic:5:1:1"])
def test_malformed_generated_spec_is_a_data_error(tokenizer, spec):
    from training.data import GeneratedDataset
    with pytest.raises(DataError, match=r"--train-data .*expected synthetic:<samples>\[:<seed>\]"):
        GeneratedDataset(spec, tokenizer, image_size=(224, 224), image_length=32, max_source_length=64,
                         max_target_length=32)
