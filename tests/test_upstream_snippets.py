"""The original VisualGLM-6B README's two Python snippets run unchanged on the bundled model.

Each snippet runs as its own script, as a user would run it, with two substitutions only: our
tokenizer in place of the remote `AutoTokenizer.from_pretrained("THUDM/chatglm-6b", trust_remote_code=True)`,
and the bundled model / a local run folder in place of the 16 GB weights.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from model.positions import batch_inputs
from model.sat.checkpoint import load_model, save_checkpoint
from model.sat.finetune import is_adapter_key

ROOT = Path(__file__).resolve().parent.parent

CHAT_SNIPPET = '''
import argparse
from model.tokenizer import ChatGLMTokenizer
tokenizer = ChatGLMTokenizer.from_pretrained("{tokenizer}")
from model import chat, VisualGLMModel
model, model_args = VisualGLMModel.from_pretrained('visualglm-tiny', args=argparse.Namespace(fp16=True, skip_init=True))
from sat.model.mixins import CachedAutoregressiveMixin
model.add_mixin('auto-regressive', CachedAutoregressiveMixin())
image_path = "{image}"
response, history, cache_image = chat(image_path, model, tokenizer, "描述这张图片。", history=[])
print(response)
response, history, cache_image = chat(None, model, tokenizer, "图中有几个图形？", history=history, image=cache_image)
print(response)
'''

MERGE_SNIPPET = '''
from finetune_visualglm import FineTuneVisualGLMModel
import argparse

model, args = FineTuneVisualGLMModel.from_pretrained('{run}',
        args=argparse.Namespace(
        fp16=True,
        skip_init=True,
        use_gpu_initialization=True,
        device='cuda',
    ))
model.get_mixin('lora').merge_lora()
args.layer_range = []
args.save = 'merge_lora'
args.mode = 'inference'
from sat.training.model_io import save_checkpoint
save_checkpoint(1, model, None, None, args)
'''

# Appended to the chat snippet (not part of it): what the test checks afterwards.
REPORT = '''
import json
print("REPORT " + json.dumps({"history": history, "image_shape": list(cache_image.shape),
                              "image_dtype": str(cache_image.dtype), "weights": str(next(model.parameters()).dtype)}))
'''


def run_script(code: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_original_sat_chat_snippet(tmp_path):
    bundled = ROOT / "pretrained" / "visualglm-tiny"
    code = CHAT_SNIPPET.format(tokenizer=bundled, image=ROOT / "examples" / "1.png")
    out = run_script(textwrap.dedent(code) + REPORT, tmp_path)
    report = json.loads(out.split("REPORT ", 1)[1])
    first, second = report["history"]
    assert first[0] == "描述这张图片。" and second[0] == "图中有几个图形？"
    lines = out.splitlines()
    assert first[1] in lines and second[1] in lines                   # printed answers are the history's
    assert report["image_shape"] == [1, 32, 320]                       # the image, encoded once and reused
    assert report["weights"] == report["image_dtype"] == "torch.float16"   # fp16=True was honoured


def probe_logits(m) -> torch.Tensor:
    ids, pos, mask, _ = batch_inputs([[20, 21, 22, 23, 24, 25, 26, m.config["gmask_token_id"],
                                       m.config["bos_token_id"]]], pad_id=3)
    with torch.no_grad():
        return m.float()(input_ids=ids, position_ids=pos, attention_mask=mask)[0].float()


def test_original_lora_merge_snippet_writes_a_checkpoint_that_loads(tmp_path):
    lora = load_model("visualglm-tiny", overwrite_config={"model_class": "FineTuneVisualGLMModel", "use_lora": True,
                                                          "lora_rank": 4, "layer_range": [0, 2]},
                      allow_missing=is_adapter_key)
    with torch.no_grad():                       # a trained adapter: B is no longer zero
        for name, p in lora.named_parameters():
            if "matrix_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    save_checkpoint(lora, tmp_path / "run")
    run_script(textwrap.dedent(MERGE_SNIPPET.format(run="run")), tmp_path)

    merged = load_model(str(tmp_path / "merge_lora"))
    assert merged.config["layer_range"] == [] and not any(is_adapter_key(k) for k in merged.state_dict())
    base, tuned, folded = probe_logits(load_model("visualglm-tiny")), probe_logits(lora), probe_logits(merged)
    assert (tuned - base).abs().max() > 0.02                  # the adapters change the output ...
    assert torch.allclose(folded, tuned, atol=5e-3, rtol=0)   # ... and the merged fp16 folder keeps it
