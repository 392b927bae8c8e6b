"""The architecture's promises: the chat core works without sat, only model/sat imports sat, and the
modules of model/ do not import each other in a circle."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A backend written for this test in plain torch: the engine must drive it with no sat anywhere. It
# answers every prompt with the tokens of ANSWER, then eos, and records what it was asked.
CORE_WITHOUT_SAT = r'''
import importlib.abc, sys

class NoSat(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "sat" or name.startswith("sat."):
            raise ImportError(f"sat is made unimportable for this test ({name})")
        return None

sys.meta_path.insert(0, NoSat())

import torch
import model
from model import ChatEngine, chat
from model import backend, defaults, generation, image, image_cache, positions, prompts, sampling, tokenizer
from model.tokenizer import ChatGLMTokenizer

tok = ChatGLMTokenizer.from_pretrained(sys.argv[1])
ANSWER = tok.encode("There is a red circle.", add_special_tokens=False)

class ScriptedBackend:
    image_size, image_length, max_sequence_length, device = (16, 16), 4, 512, torch.device("cpu")

    def __init__(self):
        self.encoded, self.prompts, self.steps = 0, [], 0

    def encode_image(self, pixels):                       # [B, 3, 16, 16] -> [B, 4, 8]
        self.encoded += pixels.shape[0]
        return pixels.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 4, 8).clone()

    def _logits(self, rows):
        logits = torch.zeros(len(rows), len(tok) + 8)
        for b, n in enumerate(rows):
            logits[b, ANSWER[n] if n < len(ANSWER) else tok.eos_token_id] = 10.0
        return logits

    def prefill(self, ids, positions, mask, image_embeds=None, pre_image=None, capacity=None):
        assert mask.dtype == torch.bool and positions.shape == (ids.shape[0], 2, ids.shape[1])
        self.prompts.append((ids.tolist(), None if pre_image is None else pre_image.tolist()))
        return self._logits([0] * ids.shape[0]), 0

    def decode_step(self, tokens, positions, key_mask, cache):
        assert key_mask.dtype == torch.bool and key_mask.shape[1] == len(self.prompts[-1][0][0]) + cache + 1
        return self._logits([cache + 1] * tokens.shape[0]), cache + 1

be = ScriptedBackend()
pixels = torch.rand(1, 3, 16, 16)
response, history, img = chat(None, be, tok, "Describe it.", image=pixels, english=True, top_k=1)
assert response == "There is a red circle.", response
assert img.shape == (1, 4, 8) and be.encoded == 1
again, history, _ = chat(None, be, tok, "And again?", history=history, image=img, english=True, top_k=1)
assert be.encoded == 1                                    # embeddings given back are not re-encoded
img_tag = len(tok.encode("<img>", add_special_tokens=False))
assert len(history) == 2 and be.prompts[-1][1] == [img_tag]   # the image slots follow the "<img>" tokens
engine = ChatEngine(be, tok)
engine.encode_images([pixels, pixels.clone(), torch.zeros(1, 3, 16, 16)])
assert be.encoded == 3 and engine.images.stats["images_encoded"] == 2   # identical pixels once
assert not any(name == "sat" or name.startswith("sat.") for name in sys.modules)
try:
    model.VisualGLMModel
except ImportError as e:
    print("sat model refused:", e)
else:
    raise AssertionError("VisualGLMModel should need sat")
print("CORE OK")
'''


def test_the_core_runs_with_sat_unimportable():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", CORE_WITHOUT_SAT, str(ROOT / "pretrained" / "visualglm-tiny")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "CORE OK" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "sat model refused" in done.stdout


def product_files():
    skip = {".venv", "tests", ".git", "recipes", "benchmarks"}
    for path in ROOT.rglob("*.py"):
        if not skip.intersection(path.relative_to(ROOT).parts[:1]):
            yield path


def imported_modules(path: Path):
    """Absolute names of every module a file imports, at any depth (function-level imports too)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def test_only_model_sat_imports_sat():
    offenders = [str(p.relative_to(ROOT)) for p in product_files()
                 if not p.relative_to(ROOT).parts[:2] == ("model", "sat")
                 and any(m == "sat" or m.startswith("sat.") for m in imported_modules(p))]
    assert offenders == [], f"these files import sat directly: {offenders}"


def test_model_has_no_import_cycles():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "model").rglob("*.py")}
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name and not name.startswith(m + ".")}
             for name, path in modules.items()}   # a module importing its own package (__init__) is fine

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, graph) if c]
    assert cycles == [], f"import cycles in model/: {cycles[:3]}"
