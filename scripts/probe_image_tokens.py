#!/usr/bin/env python
"""What a VisualGLM checkpoint's vision path knows: linear probes on scenes with one shape.

    python scripts/probe_image_tokens.py --from_pretrained visualglm-tiny [--scenes 1200]

For each lone shape it predicts the shape's kind (4 classes) and grid cell (9 classes) with a
logistic regression on (a) the ViT's patch features and (b) the 32 image tokens the GLM sees, and
prints held-out accuracy; it also prints how much the features change when a lone square moves,
changes kind or changes colour. When (a) knows the cell and (b) does not, the Q-Former is dropping place;
when neither knows the kind, the ViT has not learned shapes. Chance is 25% / 11%.
"""
import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def features(model, scenes, batch=100):
    from model.image import preprocess
    blip = model.get_mixin("eva").model
    patches, tokens = [], []
    with torch.no_grad():
        for i in range(0, len(scenes), batch):
            pixels = torch.cat([preprocess(s.render(), blip.image_size) for s in scenes[i:i + batch]])
            enc = blip.vit(pixels.to(next(blip.parameters()).dtype))           # [B, 1 + patches, eva_hidden]
            image = blip.glm_proj(blip.qformer(enc, blip.image_length))       # [B, image_length, hidden]
            patches.append(enc[:, 1:].flatten(1).float())
            tokens.append(image.flatten(1).float())
    return torch.cat(patches), torch.cat(tokens)


def sensitivity(model) -> dict:
    """Relative change of the ViT feature at a lone square's centre patch, and of the 32 image tokens,
    when the square moves (top-left -> bottom-right), changes kind or changes colour."""
    from model.image import preprocess
    from synthetic.scenes import Scene, Shape, cell_centre
    blip = model.get_mixin("eva").model
    grid = blip.image_size[0] // 14

    def run(kind="square", colour="red", cell="top-left"):
        scene = Scene(background="white", shapes=[Shape(kind=kind, colour=colour, cell=cell, radius=28)])
        with torch.no_grad():
            enc = blip.vit(preprocess(scene.render(), blip.image_size))           # [1, 1 + patches, hidden]
            tokens = blip.glm_proj(blip.qformer(enc, blip.image_length))[0]
        x, y = cell_centre(cell)
        patch = enc[0, 1:].reshape(grid, grid, -1)[int(y // 14), int(x // 14)]
        return patch, tokens

    base = run()
    out = {}
    for name, change in (("cell", {"cell": "bottom-right"}), ("kind", {"kind": "triangle"}),
                         ("colour", {"colour": "blue"})):
        other = run(**change)
        out[name] = tuple(((o - b).norm() / b.norm()).item() for o, b in zip(other, base))
    return out


def probe(x: torch.Tensor, y: torch.Tensor, n_train: int, steps: int = 300) -> float:
    """Held-out accuracy of an L2-regularised linear classifier trained on the first n_train rows."""
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-5
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:n_train] @ w, y[:n_train]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    return ((x[n_train:] @ w).argmax(1) == y[n_train:]).float().mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from_pretrained", required=True)
    p.add_argument("--scenes", type=int, default=1200, help="single-shape scenes; two thirds train the probes")
    p.add_argument("--seed", type=int, default=5)
    a = p.parse_args(argv)
    import model  # noqa: F401  sat compatibility fixes
    from model.checkpoint import load_model
    from synthetic.scenes import CELLS, SHAPE_KINDS, sample_scene

    torch.manual_seed(0)
    m = load_model(a.from_pretrained, device="cpu", dtype=torch.float32).eval()
    rng = random.Random(a.seed)
    scenes = []
    while len(scenes) < a.scenes:
        s = sample_scene(rng)
        if len(s.shapes) == 1:
            scenes.append(s)
    kind = torch.tensor([SHAPE_KINDS.index(s.shapes[0].kind) for s in scenes])
    cell = torch.tensor([CELLS.index(s.shapes[0].cell) for s in scenes])
    patches, tokens = features(m, scenes)
    n = a.scenes * 2 // 3
    sens = sensitivity(m)
    print("relative change when a lone square " + ", ".join(
        f"{k}: patch {v[0]:.3f} tokens {v[1]:.3f}" for k, v in sens.items()))
    print(f"{'probe':<28} {'kind':>6} {'cell':>6}")
    for name, x in (("ViT patch features", patches), ("32 image tokens (GLM input)", tokens)):
        print(f"{name:<28} {probe(x, kind, n):>6.0%} {probe(x, cell, n):>6.0%}")


if __name__ == "__main__":
    main()
