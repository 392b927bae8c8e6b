#!/usr/bin/env python
"""Accuracy of a VisualGLM checkpoint on synthetic image questions, per question type and language.

    python evaluate.py --from_pretrained <ckpt> --split <dir with dataset.json>
    python evaluate.py --from_pretrained <ckpt> --generate 200 --seed 2 [--types colour count ...]
                       [--include_background] [--wording templates|trained|rewordings] [--json out.json]

Answers are generated greedily (top_k=1, no repetition penalty unless --repetition_penalty) through
the project's chat engine (model.chat.chat on model.sat.loading.load_model_and_tokenizer). The scoring itself is
`evaluate(items, answer_fn)`, where `answer_fn(image_path, prompt, history, english) -> str`;
multi-turn items are asked turn by turn with the model's own earlier answers as history, and are
reported in the row `multi_turn` (one count per turn). `--oracle` answers with the reference
labels instead of a model (a check of the data and the grader: it must score 100%). `--wording`
picks the questions of --generate (synthetic.qa.WORDINGS): the original templates (default), the
continued training's mix, or the held-out rewordings that no training has seen.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from synthetic.dataset import EVAL_SEED, DEFAULT_MULTI_TURN_FRACTION, generate_split, load_split
from synthetic.grading import grade
from synthetic.qa import LANGS, QUESTION_TYPES, WORDINGS

AnswerFn = Callable[[str, str, List[Tuple[str, str]], bool], str]
MULTI_TURN = "multi_turn"
ROWS: Tuple[str, ...] = QUESTION_TYPES + (MULTI_TURN,)


def _image_path(item: dict, base_dir: Optional[str]) -> str:
    img = item["img"]
    if base_dir is not None and not os.path.isabs(img):
        return os.path.join(base_dir, img)
    return img


def _cell(correct: int, total: int) -> dict:
    return {"correct": correct, "total": total, "accuracy": (correct / total) if total else None}


def summarise(records: Sequence[dict]) -> dict:
    """Per-row (question type, or multi_turn) and per-language counts and accuracies."""
    rows: Dict[str, dict] = {}
    names = [r for r in ROWS if any(rec["row"] == r for rec in records)]
    names += sorted({rec["row"] for rec in records} - set(names))
    for name in names:
        in_row = [rec for rec in records if rec["row"] == name]
        row = {}
        for lang in LANGS:
            sel = [rec for rec in in_row if rec["lang"] == lang]
            row[lang] = _cell(sum(rec["correct"] for rec in sel), len(sel))
        row["all"] = _cell(sum(rec["correct"] for rec in in_row), len(in_row))
        rows[name] = row
    overall = {lang: _cell(sum(r["correct"] for r in records if r["lang"] == lang),
                           sum(1 for r in records if r["lang"] == lang)) for lang in LANGS}
    overall["all"] = _cell(sum(r["correct"] for r in records), len(records))
    return {"rows": rows, "overall": overall, "records": list(records)}


def evaluate(items: Iterable[dict], answer_fn: AnswerFn, base_dir: Optional[str] = None,
             verbose: bool = False, progress: bool = False) -> dict:
    """Ask every question of `items` (dataset.json entries) through `answer_fn` and grade it.

    Returns {"rows": {row: {"zh"|"en"|"all": {"correct", "total", "accuracy"}}}, "overall": {...},
    "records": [one dict per graded turn]}. `img` paths are used as given, or joined to `base_dir`.
    `progress`: a bar of questions answered, with an ETA, on stderr (1,000 images take minutes on a CPU)."""
    items = list(items)
    records: List[dict] = []
    shown = None
    if progress:
        from model.progress import bar
        shown = bar(total=sum(len(it.get("conversations", [it])) for it in items), desc="Evaluating",
                    unit="question")
    say = (lambda text: shown.write(text, file=sys.stdout)) if shown is not None else print
    for index, item in enumerate(items):
        lang = item["lang"]
        english = lang == "en"
        image_path = _image_path(item, base_dir)
        if "conversations" in item:
            turns, row = item["conversations"], MULTI_TURN
        else:
            turns, row = [item], item["type"]
        history: List[Tuple[str, str]] = []
        for turn_index, turn in enumerate(turns):
            if "type" not in turn or "answer" not in turn:
                raise ValueError(f"item {index} has no 'type'/'answer' to grade against")
            response = answer_fn(image_path, turn["prompt"], list(history), english)
            response = "" if response is None else str(response)
            correct = grade(turn["type"], turn["answer"], response, lang)
            records.append({"item": index, "turn": turn_index, "row": row, "type": turn["type"], "lang": lang,
                            "img": item["img"], "prompt": turn["prompt"], "label": turn.get("label"),
                            "response": response, "answer": turn["answer"], "correct": bool(correct)})
            if verbose:   # (through the bar when there is one, which keeps it below the lines)
                mark = "ok " if correct else "BAD"
                say(f"[{mark}] {row}/{turn['type']} {lang} {item['img']}\n  Q: {turn['prompt']}\n"
                    f"  A: {response}\n  expected: {turn.get('label')}")
            history.append((turn["prompt"], response))
            if shown is not None:
                shown.update(1)
    if shown is not None:
        shown.close()
    return summarise(records)


def format_table(results: dict) -> str:
    """A plain-text table: one line per row, columns zh / en / all as correct/total and percent."""
    def fmt(cell: dict) -> str:
        if not cell["total"]:
            return "-"
        return f"{cell['correct']}/{cell['total']} {100.0 * cell['accuracy']:5.1f}%"

    header = ("type",) + LANGS + ("all",)
    lines = [[name] + [fmt(row[c]) for c in LANGS + ("all",)] for name, row in results["rows"].items()]
    lines.append(["overall"] + [fmt(results["overall"][c]) for c in LANGS + ("all",)])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
    for line in lines:
        out.append("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    return "\n".join(out)


def build_answer_fn(from_pretrained: str, device: Optional[str] = None, quant: Optional[int] = None,
                    max_length: int = 512, repetition_penalty: float = 1.0) -> AnswerFn:
    """answer_fn backed by the project's chat engine, greedy (top_k=1). The image embeddings of
    the last image are reused for the next question about the same image (multi-turn items)."""
    import torch
    from model.chat import PromptTooLongError, chat
    from model.sat.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(from_pretrained, device=device, quant=quant)
    if hasattr(model, "eval"):
        model.eval()
    cache: Dict[str, object] = {}

    def answer_fn(image_path: str, prompt: str, history: List[Tuple[str, str]], english: bool) -> str:
        image = cache.get(image_path)
        try:
            with torch.no_grad():
                response, _, image = chat(image_path, model, tokenizer, prompt, history=list(history),
                                          image=image, max_length=max_length, top_k=1,
                                          repetition_penalty=repetition_penalty, english=english)
        except PromptTooLongError:
            # Earlier (long, wrong) answers in the history left no room: this turn scores as wrong.
            return ""
        cache.clear()
        if image is not None:
            cache[image_path] = image
        return response

    return answer_fn


def oracle_answer_fn(items: Iterable[dict], base_dir: Optional[str] = None) -> AnswerFn:
    """answer_fn that replies with the reference label (for checking the pipeline)."""
    table = {}
    for item in items:
        for turn in item.get("conversations", [item]):
            table[(_image_path(item, base_dir), turn["prompt"])] = turn["label"]

    def answer_fn(image_path, prompt, history, english):
        return table[(image_path, prompt)]

    return answer_fn


def _filter_types(items: List[dict], types: Optional[Sequence[str]]) -> List[dict]:
    if not types:
        return items
    wanted = set(types)
    return [it for it in items if it.get("type") in wanted]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="Evaluate VisualGLM on synthetic image questions.")
    parser.add_argument("--from_pretrained", help="checkpoint (name or path) for model.sat.loading")
    parser.add_argument("--oracle", action="store_true", help="answer with the reference labels, no model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", help="folder holding dataset.json (or the json file)")
    source.add_argument("--generate", type=int, metavar="N", help="generate N fresh images")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="seed for --generate")
    parser.add_argument("--types", nargs="+", choices=list(ROWS), help="question types to ask")
    parser.add_argument("--include_background", action="store_true",
                        help="also ask the held-out background question (--generate)")
    parser.add_argument("--multi_turn_fraction", type=float, default=DEFAULT_MULTI_TURN_FRACTION)
    parser.add_argument("--lang", choices=list(LANGS), help="only this language (--generate)")
    parser.add_argument("--wording", choices=list(WORDINGS), default="templates",
                        help="which questions --generate asks: the original templates (default), the continued "
                             "training's mix (adds absent-shape questions), or held-out rewordings never trained on")
    parser.add_argument("--out_dir", help="where --generate writes images (default: a temporary folder)")
    parser.add_argument("--limit", type=int, help="ask at most this many items")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--quant", type=int, choices=[4, 8], default=None)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--repetition_penalty", type=float, default=1.0,
                        help="1.0 (none) by default for scoring; the chat demo uses 1.2")
    parser.add_argument("--json", dest="json_out", help="write results (with every response) here")
    parser.add_argument("--verbose", action="store_true", help="print every question and response")
    args = parser.parse_args(argv)
    if not args.oracle and not args.from_pretrained:
        parser.error("--from_pretrained is required (or --oracle)")
    return _run(args)


def _read_split(path) -> List[dict]:
    try:
        return load_split(path)
    except (OSError, ValueError) as e:    # no such folder or dataset.json, or not JSON
        raise SystemExit(f"error: cannot read the split {path}: {e}") from None


def _run(args) -> dict:
    """main() after parsing. What a user can get wrong (a model that cannot be found or loaded, a missing
    split or image) ends the command with `error: ...` and status 1 (SystemExit), not a traceback."""
    from model.image import ImageLoadError
    from model.sat.checkpoint import CheckpointError

    tmp = None
    if args.split:
        items = _filter_types(_read_split(args.split), args.types)
    else:
        types = [t for t in (args.types or []) if t != MULTI_TURN] or None
        include_background = args.include_background or bool(types and "background" in types)
        fraction = args.multi_turn_fraction
        if args.types and MULTI_TURN not in args.types:
            fraction = 0.0
        out_dir = args.out_dir
        if out_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="synthetic-eval-")
            out_dir = os.path.join(tmp.name, f"eval-{args.seed}")
        from model.progress import bar
        with bar(total=args.generate, desc="Generating images", unit="image") as shown:
            generate_split(out_dir, args.generate, args.seed, include_background=include_background,
                           multi_turn_fraction=fraction, types=types, lang=args.lang,
                           on_image=lambda: shown.update(1), wording=args.wording)
        items = _read_split(out_dir)
        if args.types and MULTI_TURN in args.types and len(args.types) == 1:
            items = [it for it in items if it["type"] == MULTI_TURN]
    if args.limit is not None:
        items = items[:args.limit]

    try:
        if args.oracle:
            answer_fn = oracle_answer_fn(items)
        else:
            answer_fn = build_answer_fn(args.from_pretrained, device=args.device, quant=args.quant,
                                        max_length=args.max_length, repetition_penalty=args.repetition_penalty)
        results = evaluate(items, answer_fn, verbose=args.verbose, progress=True)
    except (CheckpointError, ImageLoadError) as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(results))
    if args.json_out:
        payload = dict(results)
        payload["args"] = {k: v for k, v in vars(args).items()}
        Path(args.json_out).write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
