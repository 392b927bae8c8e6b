"""Recipe for the bundled small VisualGLM, `visualglm-tiny`: same architecture, smaller sizes.

    python -m recipes.tiny_model prepare --out work/tiny --tokenizer pretrained/visualglm-tiny
        # tokenizer/, model_config.json, init/ (the initial checkpoint), data/valid/
    python finetune_visualglm.py --mode pretrain --from_pretrained work/tiny/init --tokenizer work/tiny/tokenizer \
        --train-data synthetic:50000000:1 ...
    python -m recipes.tiny_model export --from <training output> --to <folder> --tokenizer work/tiny/tokenizer
    python -m recipes.tiny_model init --work work/tiny --out <folder> [options]   # another initial checkpoint

`recipes/train_visualglm_tiny.sh` runs the whole recipe. recipes/README.md says how to run it, and
docs/bundled-model.md how the shipped checkpoint was made and why its initialisation is what it is.
"""
import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch

# Sizes chosen to stay well under 25 MB in fp16 while leaving the ViT enough capacity to learn
# colours, shapes, counts and positions from scratch (head size 64 everywhere, like the big model).
TINY_ARCH = dict(num_layers=4, hidden_size=320, num_attention_heads=5, eva_layers=4, eva_hidden=192,
                 eva_heads=3, qformer_layers=2, qformer_hidden=192, qformer_heads=3, image_length=32)
# Trained from scratch on the language-model loss alone, the image path starves at sat's default init:
# the Q-Former's cross-attention output is about 2% of its output. So every Q-Former layer cross-attends,
# and the cross-attention output projection starts CROSS_GAIN times larger (the image is then 10-40% of
# the Q-Former output at step 0).
# No dropout: the model underfits its synthetic data, so dropout would only slow it down.
TINY_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)
CROSS_GAIN = 5.0
POS_SCALE = 1.0   # sine-cosine entries have std 0.71; a patch embedding at init has std ~0.5
# Spatial queries (init_spatial_queries): a 5 x 5 lattice of local pools (spacing 3.2 patches) whose
# attention at init covers ~28 patches, nearly all within 3 patches of the lattice point.
LATTICE = 5
SPATIAL_FREQS = (0.15, 1.0)   # radians per patch
QUERY_SCALE = 8.0   # query embeddings 8x the codes: with pre-LN they stay the bulk of each token's residual
# Pre-LN Q-Former (a config value; the released 6B uses post-LN). Trained from scratch with post-LN, the
# queries collapsed into one vector, so the 32 image tokens were identical and said nothing about place.
# Pre-LN keeps each query's own embedding in the residual stream.
QFORMER_LAYERNORM = "pre"
TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json")


def tokenizer_corpus(seed: int):
    """Questions and answers as the chat engine presents them, so prompt pieces get their own tokens."""
    from model.prompts import build_prompt
    from synthetic.dataset import build_corpus
    texts = build_corpus(n_images=3000, seed=seed)
    templated = []
    for i, t in enumerate(texts[:4000]):
        english = t[:1].isascii()
        templated.append(build_prompt(t, [("q", "a")] if i % 3 == 0 else None, english=english, image=i % 2 == 0))
    return texts + templated


def _train_shard(args):
    from synthetic.dataset import generate_split
    out, n, seed, questions_per_image = args
    generate_split(out, n, seed=seed, questions_per_image=questions_per_image)
    return str(Path(out) / "dataset.json")


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] fixed 2-D sine-cosine table (row-major patches, as the patch embedding
    flattens them): half the channels encode the row, half the column; neighbours get similar rows."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * freqs[None]          # [grid, quarter]
    axis = torch.cat([pos.sin(), pos.cos()], dim=1)                                # [grid, dim / 2]
    rows = axis[:, None, :].expand(grid, grid, -1)
    cols = axis[None, :, :].expand(grid, grid, -1)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1])).float()


@torch.no_grad()
def init_vit_positions(model, scale: float) -> None:
    """Start the ViT's learned position embeddings from a 2-D sine-cosine table times `scale`.

    At sat's init the position embeddings (std 0.02) are about 4% of a patch embedding's size, so the
    patches say what colour they are but hardly where. A table of the patches' own size, smooth across
    neighbours, makes place visible from step 0. This is the older initialisation (--lattice 0);
    the shipped one uses position_codes instead (see init_spatial_queries)."""
    vit = model.get_mixin("eva").model.vit
    table = vit.transformer.position_embeddings.weight              # [1 + grid * grid, hidden]
    grid = int(round((table.shape[0] - 1) ** 0.5))
    table[1:] = scale * sincos_2d(grid, table.shape[1]).to(table.dtype)


def position_codes(rows: torch.Tensor, cols: torch.Tensor, dim: int, head_dim: int,
                   freqs=SPATIAL_FREQS) -> torch.Tensor:
    """[..., dim] codes of (fractional) patch coordinates, built so that within every attention head of
    `head_dim` channels the dot product of two codes is sum_f cos(f * drow) + cos(f * dcol): largest at
    the same place and falling off within a few patches. Each head holds the same head_dim / 4
    frequencies (geometric from freqs[0] to freqs[1] radians per patch), as [sin r, cos r, sin c, cos c]."""
    n = head_dim // 4
    f = torch.logspace(math.log10(freqs[0]), math.log10(freqs[1]), n, dtype=torch.float64)
    r = torch.as_tensor(rows, dtype=torch.float64)[..., None] * f
    c = torch.as_tensor(cols, dtype=torch.float64)[..., None] * f
    head = torch.stack([r.sin(), r.cos(), c.sin(), c.cos()], dim=-1).flatten(-2)   # [..., 4 n]
    head = torch.nn.functional.pad(head, (0, head_dim - head.shape[-1]))
    return head.repeat(*([1] * (head.dim() - 1)), dim // head_dim).float()


@torch.no_grad()
def init_spatial_queries(model, lattice: int = LATTICE, pos_scale: float = POS_SCALE,
                         query_scale: float = QUERY_SCALE) -> None:
    """Make the first lattice**2 of the Q-Former's queries start as local pools over a lattice x lattice
    grid of the image, so that image token k begins as a summary of its own region.

    The ViT position embeddings become position_codes (times pos_scale), the queries the codes of their
    lattice points (times query_scale), and every cross-attention starts with identity query and key
    projections, so a query's attention logits start as the code similarity: highest on the patches
    around its point. The GLM can then tell where a shape is by which tokens carry it. The remaining
    queries stay random (free to learn global facts such as the count or the background)."""
    blip = model.get_mixin("eva").model
    vit, qformer = blip.vit, blip.qformer
    table = vit.transformer.position_embeddings.weight                 # [1 + grid * grid, vit hidden]
    grid = int(round((table.shape[0] - 1) ** 0.5))
    hidden = table.shape[1]
    layers = [layer for layer in qformer.transformer.layers if getattr(layer, "cross_attention", None) is not None]
    cross = layers[0].cross_attention
    head_dim = cross.hidden_size_per_attention_head
    if cross.query.weight.shape != (hidden, hidden) or cross.key_value.weight.shape[1] != hidden:
        raise ValueError("spatial queries need the Q-Former, its cross-attention and the ViT to share one hidden size")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table[1:] = pos_scale * position_codes(rows.flatten(), cols.flatten(), hidden, head_dim).to(table.dtype)
    # lattice points at the centres of a lattice x lattice split of the patch grid (patch coordinates)
    centres = (torch.arange(lattice, dtype=torch.float64) + 0.5) * grid / lattice - 0.5
    lr, lc = torch.meshgrid(centres, centres, indexing="ij")
    queries = qformer.transformer.word_embeddings.weight                 # [queries, hidden]
    if queries.shape[0] < lattice * lattice:
        raise ValueError(f"a {lattice}x{lattice} lattice needs {lattice * lattice} queries, the Q-Former has {queries.shape[0]}")
    queries[:lattice * lattice] = query_scale * position_codes(lr.flatten(), lc.flatten(), hidden, head_dim).to(queries.dtype)
    eye = torch.eye(hidden, dtype=queries.dtype)
    for layer in layers:
        attn = layer.cross_attention
        attn.query.weight.copy_(eye)
        attn.query.bias.zero_()
        attn.key_value.weight[:hidden] = eye                              # [K | V] rows
        attn.key_value.bias[:hidden] = 0


def make_init(config: dict, out: Path, tokenizer_dir: Path, cross_gain: float, seed: int,
              pos_scale: float = POS_SCALE, lattice: int = LATTICE, query_scale: float = QUERY_SCALE) -> Path:
    """sat's random init (seeded), with the Q-Former cross-attention output projection scaled by
    cross_gain and, with lattice > 0, spatial queries over a lattice x lattice grid (see
    init_spatial_queries), or with lattice 0 the ViT's position embeddings started from a 2-D
    sine-cosine table (see init_vit_positions; pos_scale 0 leaves sat's random ones)."""
    from model.sat.checkpoint import build_args, model_class, save_checkpoint
    cls = model_class(config["model_class"])
    m = cls(build_args(cls, config, skip_init=False, seed=seed))
    m.config = dict(config)
    with torch.no_grad():
        for name, p in m.get_mixin("eva").model.qformer.named_parameters():
            if "cross_attention.dense.weight" in name:
                p.mul_(cross_gain)
    if lattice:
        init_spatial_queries(m, lattice, pos_scale, query_scale)
    elif pos_scale:
        init_vit_positions(m, pos_scale)
    save_checkpoint(m, out, overwrite=True)
    for f in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / f, Path(out) / f)
    return out


def prepare(out: Path, n_train: int, n_valid: int, questions_per_image: int, seed: int, vocab_size: int,
            shards: int = 1, cross_gain: float = CROSS_GAIN, tokenizer: Optional[Path] = None) -> dict:
    """Training images are written as `shards` splits (train-0, train-1, ...) generated in parallel,
    shard i from seed `seed * 1000 + i`; pass all their dataset.json files to --train-data.
    `tokenizer`: a folder whose tokenizer to reuse instead of training one (sentencepiece's output
    varies between its versions, so reusing the shipped one keeps token ids identical)."""
    from multiprocessing import Pool
    from model.configs import tiny_config
    from model.tokenizer import train_tokenizer
    from synthetic.dataset import EVAL_SEED, generate_split
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        from model.sat.loading import load_tokenizer
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        for f in TOKENIZER_FILES:
            shutil.copy(Path(tokenizer) / f, out / "tokenizer" / f)
        tok = load_tokenizer(out / "tokenizer")
    else:
        tok = train_tokenizer(tokenizer_corpus(seed), out / "tokenizer", vocab_size=vocab_size)
    vocab = -(-len(tok) // 64) * 64  # round up: rows beyond the tokenizer are never produced
    config = tiny_config(vocab_size=vocab, bos_token_id=tok.bos_token_id, mask_token_id=tok.mask_token_id,
                         gmask_token_id=tok.gmask_token_id, pad_token_id=tok.pad_token_id,
                         tokenizer_type="visualglm-tiny", **TINY_ARCH)
    config["qformer_args"]["is_decoder"] = [True] * TINY_ARCH["qformer_layers"]
    config["qformer_args"]["layernorm_order"] = QFORMER_LAYERNORM
    for part in (config, config["eva_args"], config["qformer_args"]):
        part.update(TINY_DROPOUT)
    (out / "model_config.json").write_text(json.dumps(config, indent=2))
    make_init(config, out / "init", out / "tokenizer", cross_gain, seed)
    if n_train:   # 0: train on `--train-data synthetic:...` (generated on the fly) instead
        jobs = [(out / "data" / f"train-{i}", n_train // shards + (i < n_train % shards), seed * 1000 + i,
                 questions_per_image) for i in range(shards)]
        with Pool(min(shards, 16)) as pool:
            files = pool.map(_train_shard, jobs)
        (out / "train_files.txt").write_text("\n".join(files) + "\n")
    generate_split(out / "data" / "valid", n_valid, seed=EVAL_SEED + 1000)
    print(f"tokenizer: {len(tok)} pieces; model vocab {vocab}; data in {out / 'data'}")
    return config


def export(src: str, dst: Path, tokenizer_dir: Path, overwrite: bool = False) -> Path:
    """A trained checkpoint -> a plain fp16 VisualGLMModel folder with its tokenizer inside."""
    from model.sat.checkpoint import build_model, load_model, save_checkpoint
    trained = load_model(src, device="cpu", dtype=torch.float32)
    config = {k: v for k, v in trained.config.items()
              if k not in ("pre_seq_len", "lora_rank", "use_ptuning", "use_lora", "use_qlora", "layer_range")}
    config["model_class"] = "VisualGLMModel"
    plain = build_model(config, device="cpu", dtype=torch.float16)
    state = {k: v for k, v in trained.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"cannot export: missing {missing[:5]}, unexpected {unexpected[:5]} (merge adapters first)")
    out = save_checkpoint(plain.half(), dst, config=config, overwrite=overwrite)
    for f in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / f, out / f)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"exported {out} ({size / 2**20:.1f} MiB)")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="generate data, train the tokenizer, write model_config.json")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--train-images", type=int, default=0, help="images to write as training splits (0: none, "
                   "train on --train-data synthetic:<samples>:<seed> instead)")
    a.add_argument("--valid-images", type=int, default=200)
    a.add_argument("--questions-per-image", type=int, default=3)
    a.add_argument("--vocab-size", type=int, default=3000)
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--shards", type=int, default=1, help="generate the training images in this many processes")
    a.add_argument("--cross-gain", type=float, default=CROSS_GAIN, help="initial scale of the Q-Former cross-attention output")
    a.add_argument("--tokenizer", type=Path, default=None, help="reuse the tokenizer in this folder instead of training one")
    i = sub.add_parser("init", help="write another initial checkpoint for a prepared folder (or a model folder)")
    i.add_argument("--work", type=Path, required=True)
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--cross-gain", type=float, default=CROSS_GAIN)
    i.add_argument("--pos-scale", type=float, default=POS_SCALE, help="0: sat's random position embeddings")
    i.add_argument("--lattice", type=int, default=LATTICE, help="N > 0: the first N*N queries start as local "
                   "pools over an N x N grid (init_spatial_queries); 0: random queries, sine-cosine ViT positions")
    i.add_argument("--query-scale", type=float, default=QUERY_SCALE, help="with --lattice: scale of the query embeddings")
    i.add_argument("--qformer-layernorm", choices=("pre", "post"), default=None,
                   help="override the Q-Former layer-norm order of the prepared config")
    i.add_argument("--seed", type=int, default=1)
    e = sub.add_parser("export", help="write the trained model as pretrained/visualglm-tiny (fp16)")
    e.add_argument("--from", dest="src", required=True)
    e.add_argument("--to", type=Path, required=True)
    e.add_argument("--tokenizer", type=Path, required=True)
    e.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    import model.sat  # noqa: F401  sat compatibility fixes
    if args.cmd == "prepare":
        prepare(args.out, args.train_images, args.valid_images, args.questions_per_image, args.seed, args.vocab_size,
                args.shards, args.cross_gain, args.tokenizer)
    elif args.cmd == "init":
        config = json.loads((args.work / "model_config.json").read_text())
        if args.qformer_layernorm:
            config["qformer_args"]["layernorm_order"] = args.qformer_layernorm
        tokenizer = args.work / "tokenizer" if (args.work / "tokenizer").is_dir() else args.work
        make_init(config, args.out, tokenizer, args.cross_gain, args.seed, args.pos_scale, args.lattice,
                  args.query_scale)
    else:
        export(args.src, args.to, args.tokenizer, args.overwrite)


if __name__ == "__main__":
    main()
