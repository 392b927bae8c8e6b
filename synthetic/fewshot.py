"""Build fewshot-data.zip: the few-shot fine-tuning set for the held-out background question.

The zip holds one folder, `fewshot-data/`, with 20 PNG images and `fewshot-data/dataset.json` in
the original VisualGLM format (`"img": "fewshot-data/00.png"`, relative to the folder the zip is
extracted in). Backgrounds are spread evenly over the six background colours. Every image is asked
the background question twice, once in Chinese and once in English, and two questions the model
already answers (a description and one other type, alternating languages): trained on the new
question alone, LoRA also starts answering "What colour is the circle?" with the background, while
these rehearsal questions keep the old skills in place (README, "Few-shot fine-tuning"). The zip is
byte-for-byte reproducible (fixed order, timestamps and attributes), given the same zlib.

    python -m synthetic.fewshot [--out fewshot-data.zip]
"""
from __future__ import annotations

import argparse
import io
import json
import random
import zipfile
from pathlib import Path
from typing import Dict, List, Union

from .dataset import FEWSHOT_SEED
from .qa import PRETRAIN_TYPES, make_qa
from .scenes import BACKGROUND_COLOURS, sample_scene

FEWSHOT_DIRNAME = "fewshot-data"
FEWSHOT_IMAGES = 20
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ZIP = REPO_ROOT / "fewshot-data.zip"

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def build_fewshot_files(seed: int = FEWSHOT_SEED, n_images: int = FEWSHOT_IMAGES) -> Dict[str, bytes]:
    """{archive name: content}, images first, then dataset.json (4 items per image: background in
    zh and en, a description, one other pretraining question)."""
    rng = random.Random(seed)
    backgrounds: List[str] = []
    while len(backgrounds) < n_images:
        block = list(BACKGROUND_COLOURS)
        rng.shuffle(block)
        backgrounds.extend(block)
    backgrounds = backgrounds[:n_images]
    others = [t for t in PRETRAIN_TYPES if t != "describe"]

    files: Dict[str, bytes] = {}
    items = []
    for index in range(n_images):
        scene = sample_scene(rng, background=backgrounds[index])
        name = f"{FEWSHOT_DIRNAME}/{index:02d}.png"
        buffer = io.BytesIO()
        scene.render().save(buffer, format="PNG", optimize=True)
        files[name] = buffer.getvalue()
        first, second = ("zh", "en") if index % 2 == 0 else ("en", "zh")
        questions = [make_qa(scene, "background", "zh", rng), make_qa(scene, "background", "en", rng),
                     make_qa(scene, "describe", first, rng), make_qa(scene, rng.choice(others), second, rng)]
        items.extend({"img": name, "prompt": qa.prompt, "label": qa.label, "type": qa.type, "lang": qa.lang,
                      "answer": dict(qa.answer)} for qa in questions)
    files[f"{FEWSHOT_DIRNAME}/dataset.json"] = (json.dumps(items, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    return files


def _zip_info(name: str, is_dir: bool = False) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.create_system = 3
    if is_dir:
        info.external_attr = (0o40755 << 16) | 0x10
        info.compress_type = zipfile.ZIP_STORED
    else:
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
    return info


def write_fewshot_zip(path: Union[str, Path] = DEFAULT_ZIP, seed: int = FEWSHOT_SEED,
                      n_images: int = FEWSHOT_IMAGES) -> Path:
    path = Path(path)
    files = build_fewshot_files(seed, n_images)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(_zip_info(FEWSHOT_DIRNAME + "/", is_dir=True), b"")
        for name, data in files.items():
            archive.writestr(_zip_info(name), data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    path.write_bytes(buffer.getvalue())
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_ZIP))
    parser.add_argument("--seed", type=int, default=FEWSHOT_SEED)
    parser.add_argument("--n_images", type=int, default=FEWSHOT_IMAGES)
    args = parser.parse_args(argv)
    path = write_fewshot_zip(args.out, args.seed, args.n_images)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
