"""A sat checkpoint of the full-size VisualGLM-6B architecture with random weights (fp16), for trying
commands that need a checkpoint folder on a machine without the released weights (a GPU box offline).

    python benchmarks/random_checkpoint.py /tmp/visualglm-random [--device cuda] [--layers 28]

The weights are benchmarks/bench_mp.py's (every tensor drawn from its own seeded generator, std 0.02);
the tokenizer is the bundled visualglm-tiny's, and the config's special token ids are set to its ids so
that the front ends accept the pair (answers are random tokens, of course). --layers shrinks the GLM
for a quick check on a CPU. The output folder must not exist.
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import model.sat  # noqa: E402,F401  (sat compatibility fixes first)
from model.configs import VISUALGLM_6B  # noqa: E402
from model.defaults import TOKENIZER_FILES  # noqa: E402

TOKENIZER_FROM = ROOT / "pretrained" / "visualglm-tiny"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="new checkpoint folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to draw the weights")
    p.add_argument("--layers", type=int, default=VISUALGLM_6B["num_layers"], help="GLM layers (28 = full size)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} already exists (nothing is overwritten)", file=sys.stderr)
        return 1
    from bench_mp import fill_random
    from model.sat.checkpoint import build_model, save_checkpoint
    from model.sat.loading import load_tokenizer
    tok = load_tokenizer(TOKENIZER_FROM)
    config = dict(VISUALGLM_6B, num_layers=args.layers, tokenizer_type=None, bos_token_id=tok.bos_token_id,
                  mask_token_id=tok.mask_token_id, gmask_token_id=tok.gmask_token_id, pad_token_id=tok.pad_token_id)
    m = build_model(config, device=args.device, dtype=torch.float16)
    for param in m.parameters():
        param.data = param.data.half()     # the ViT's conv is built in fp32; checkpoints store fp16
    fill_random(m)
    save_checkpoint(m, out, config=config)
    for name in TOKENIZER_FILES:
        if (TOKENIZER_FROM / name).is_file():
            shutil.copy(TOKENIZER_FROM / name, out / name)
    print(f"wrote {out} ({sum(q.numel() for q in m.parameters()) / 1e9:.2f} B random parameters, fp16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
