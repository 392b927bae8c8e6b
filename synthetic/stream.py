"""Endless synthetic training data, drawn on the fly: sample `index` of seed `seed` is a fresh scene
and one conversation about it, the same on every call and in every process.

Why: a fixed set of 16,000 images seen 22 times was memorised (training loss 0.14 against 0.27 on
held-out images) while shape and position answers stayed weak. Rendering a scene (~2 ms) costs
about what decoding its PNG would, so the trainer's loader workers can make every sample new and
nothing is written to disk. The trainer reads this source as
`--train-data synthetic:<samples>[:<seed>[:<wording>]]`; the wording (synthetic.qa.WORDINGS, default
`templates`) says which questions are asked: `trained` adds the paraphrases, colourless yes/no and
absent-shape questions that recipes/continue_visualglm_tiny.sh trains on.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence, Tuple

from PIL import Image

from .dataset import DEFAULT_MULTI_TURN_FRACTION, _resolve_types, scene_items
from .qa import WORDINGS
from .scenes import sample_scene

SPEC_PREFIX = "synthetic:"


class StreamSeed(int):
    """A stream's seed that also carries its wording. The trainer hands the seed that parse_spec gave
    it to generated_entry and needs to know nothing else about the stream; as an int it is the seed."""

    def __new__(cls, seed: int, wording: str = "templates"):
        obj = super().__new__(cls, seed)
        obj.wording = wording
        return obj

    def __reduce__(self):    # loader workers get a copy
        return (StreamSeed, (int(self), self.wording))


def parse_spec(spec: str) -> Tuple[int, StreamSeed]:
    """'synthetic:<samples>[:<seed>[:<wording>]]' -> (samples, seed with its wording); ValueError with
    the expected form otherwise."""
    parts = spec[len(SPEC_PREFIX):].split(":") if spec.startswith(SPEC_PREFIX) else []
    try:
        if len(parts) not in (1, 2, 3) or (len(parts) == 3 and parts[2] not in WORDINGS):
            raise ValueError
        samples = int(parts[0])
        seed = int(parts[1]) if len(parts) >= 2 else 1
        if samples <= 0 or seed < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{spec!r}: expected synthetic:<samples>[:<seed>][:<wording>] with samples > 0, "
                         f"seed >= 0 and a wording of {', '.join(WORDINGS)}, for example synthetic:2000000:1 "
                         f"or synthetic:2000000:1:trained") from None
    return samples, StreamSeed(seed, parts[2] if len(parts) == 3 else "templates")


def generated_entry(index: int, seed: int, types: Optional[Sequence[str]] = None,
                    multi_turn_fraction: float = DEFAULT_MULTI_TURN_FRACTION,
                    wording: Optional[str] = None) -> Tuple[dict, Image.Image]:
    """(entry, image) for sample `index`: an entry in the fine-tune format (`img` is None: the image
    comes separately) with a single question or a 2-3 turn conversation. The background question
    stays held out, as in the generated splits. `wording` defaults to the seed's (a StreamSeed's), else
    `templates`."""
    if wording is None:
        wording = getattr(seed, "wording", "templates")
    types = _resolve_types(types, include_background=False, wording=wording)
    rng = random.Random((int(seed) << 40) + index)   # its own stream per sample: any worker, any order
    scene = sample_scene(rng)
    entry = scene_items(scene, rng, None, types, multi_turn_fraction, wording=wording)[0]
    return entry, scene.render()
