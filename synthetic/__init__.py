"""Deterministic synthetic image + question/answer data for training and evaluating a small VisualGLM.

    scenes   Scene / Shape dataclasses, sample_scene(rng), rendering to 224x224 RGB PIL images
    qa       question templates (zh / en) in three wordings (the original templates, the continued
             training's mix, held-out rewordings), make_qa, sample_qa, make_conversation
    dataset  generate_split (PNG + dataset.json in the VisualGLM fine-tune format), load_split,
             build_corpus (text for tokenizer training)
    grading  grade(type_or_item, expected, response, lang) -> bool
    fewshot  fewshot-data.zip for the held-out background question
"""
from .scenes import (ALL_COLOURS, BACKGROUND_COLOURS, CELLS, IMAGE_SIZE, SHAPE_COLOURS, SHAPE_KINDS, Scene,
                     Shape, sample_scene)
from .qa import (HELD_OUT_TYPES, LANGS, PRETRAIN_TYPES, QUESTION_TYPES, QA, REWORDINGS, TEMPLATES, WORDINGS,
                 make_conversation, make_qa, sample_qa, templates_for)
from .dataset import (EVAL_SEED, FEWSHOT_SEED, TRAIN_SEED, build_corpus, generate_items, generate_split, load_split,
                      resolve_image_path)
from .grading import grade

__all__ = [
    "ALL_COLOURS", "BACKGROUND_COLOURS", "CELLS", "IMAGE_SIZE", "SHAPE_COLOURS", "SHAPE_KINDS", "Scene", "Shape",
    "sample_scene", "HELD_OUT_TYPES", "LANGS", "PRETRAIN_TYPES", "QUESTION_TYPES", "QA", "TEMPLATES",
    "REWORDINGS", "WORDINGS", "templates_for", "make_conversation", "make_qa", "sample_qa", "EVAL_SEED", "FEWSHOT_SEED", "TRAIN_SEED", "build_corpus",
    "generate_items", "generate_split", "load_split", "resolve_image_path", "grade",
]
