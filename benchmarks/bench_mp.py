"""Several GPUs: sat model parallelism (mp=1 vs mp=N) and the one-process device map, full-size VisualGLM-6B
architecture with random weights (no download), fp16 (or --dtype fp32: the greedy-equality check, where fp16
rounding at the near-ties of random logits makes the summation order of the all-reduce decide tokens).

    torchrun --nproc-per-node 1 benchmarks/bench_mp.py mp --out bench-mp       # writes bench-mp/mp1-fp16.json
    torchrun --nproc-per-node 2 benchmarks/bench_mp.py mp --out bench-mp       # mp2-fp16.json, compared with mp1
    python benchmarks/bench_mp.py device-map --map vision=cuda:0,glm=cuda:0+cuda:1

`mp`: every rank builds its part of the model on its GPU with the same random weights whatever N is (each
full tensor drawn from its own seeded generator, then cut with model/sat/mp_split.py's rule), answers one
random 224x224 image + a fixed prompt greedily with `--new-tokens` forced tokens (eos ignored) through the
chat core's generate(), and reports time to first token, decode tokens/s and each GPU's peak memory. With
mp1-<dtype>.json present, an mp=N run prints how many greedy tokens agree with mp=1.

`device-map`: the same model in one process, first on cuda:0 alone, then placed by --map: largest logit
difference of one image prompt, greedy agreement, decode tokens/s and peak memory per GPU, both ways.
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model.sat  # noqa: E402,F401  (sat compatibility fixes first)
from model.configs import VISUALGLM_6B  # noqa: E402

IMAGE_LENGTH = VISUALGLM_6B["image_length"]
PROMPT = [20, 21] + [3] * IMAGE_LENGTH + list(range(100, 120)) + [VISUALGLM_6B["gmask_token_id"],
                                                                   VISUALGLM_6B["bos_token_id"]]


def fill_random(m, rank: int = 0, size: int = 1) -> None:
    """The same random model for any model-parallel size: tensor i is drawn whole from generator(i)
    (std 0.02; layer norms 1 / 0), and this rank keeps its piece."""
    from model.sat.mp_split import partition_plan, shard
    plan = partition_plan(m)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(m.named_parameters())):
            if "layernorm" in name or "ln_vision" in name or name.endswith("norm.weight") or name.endswith("norm.bias"):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            dim, stride = plan.get(name, (0, 1))
            full = list(p.shape)
            if name in plan:
                full[dim] *= size
            g = torch.Generator(device=p.device).manual_seed(i)
            whole = torch.empty(full, dtype=torch.float32, device=p.device).normal_(0, 0.02, generator=g)
            p.copy_(shard(whole, dim, stride, rank, size) if name in plan else whole)


DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def build(device, rank=0, size=1, dtype=torch.float16):
    from model.sat.mp_split import build_parallel
    m = build_parallel(VISUALGLM_6B, size, device=device, dtype=dtype)
    for p in m.parameters():
        p.data = p.data.to(dtype)         # the ViT's conv is built in fp32; the loader stores fp16
    fill_random(m, rank, size)
    m.config = dict(VISUALGLM_6B)
    return m.eval()


def answer(backend, new_tokens: int, pixels):
    """(greedy tokens, seconds to the first token, decode tokens/s after it)."""
    from model.generation import Request, generate
    from model.sampling import SamplingParams
    params = SamplingParams(top_k=1, max_length=len(PROMPT) + new_tokens + 1, max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    start = time.perf_counter()
    emb = backend.encode_image(pixels)[0]
    tokens, first = [], None
    for step in generate(backend, [Request(ids=PROMPT, params=params, image_embeds=emb, pre_image=2)], 3, []):
        tokens.append(step[0])
        if first is None:
            torch.cuda.synchronize()
            first = time.perf_counter()
    torch.cuda.synchronize()
    return tokens, first - start, (len(tokens) - 1) / (time.perf_counter() - first)


def prompt_logits(backend, pixels) -> torch.Tensor:
    from model.positions import batch_inputs
    ids, positions, mask, _ = batch_inputs([PROMPT], 3, device=backend.device, dtype=torch.bool)
    emb = backend.encode_image(pixels)
    return backend.prefill(ids, positions, mask, emb, torch.tensor([2], device=backend.device))[0][0]


def pixels_on(device, dtype=torch.float16):
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device, dtype)


def run_mp(args) -> int:
    from model.sat.backend import SatBackend
    from model.sat.parallel import init_from_launcher
    device = init_from_launcher()
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False    # fp32 means fp32
    backend = SatBackend(build(device, rank, size, dtype))
    answer(backend, 8, pixels_on(device, dtype))              # warm-up
    torch.cuda.reset_peak_memory_stats()
    tokens, ttft, tps = answer(backend, args.new_tokens, pixels_on(device, dtype))
    peaks = [None] * size
    torch.distributed.all_gather_object(peaks, round(torch.cuda.max_memory_allocated() / 2 ** 30, 2))
    result = dict(mp=size, dtype=args.dtype, new_tokens=len(tokens), ttft_s=round(ttft, 4), decode_tokens_per_s=round(tps, 2),
                  peak_gib_per_gpu=peaks, tokens=tokens)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"mp{size}-{args.dtype}.json").write_text(json.dumps(result))
        print(json.dumps({k: v for k, v in result.items() if k != "tokens"}))
        if size > 1 and (out / f"mp1-{args.dtype}.json").is_file():
            ref = json.loads((out / f"mp1-{args.dtype}.json").read_text())
            same = next((i for i, (a, b) in enumerate(zip(ref["tokens"], tokens)) if a != b), min(len(tokens), len(ref["tokens"])))
            print(f"greedy agreement mp={size} vs mp=1: {same}/{len(ref['tokens'])} tokens"
                  f"{' (identical)' if ref['tokens'] == tokens else ''}")
            print(f"decode tokens/s: mp=1 {ref['decode_tokens_per_s']}, mp={size} {result['decode_tokens_per_s']}; "
                  f"peak GiB per GPU: mp=1 {ref['peak_gib_per_gpu']}, mp={size} {result['peak_gib_per_gpu']}")
    torch.distributed.destroy_process_group()
    return 0


def run_device_map(args) -> int:
    from model.sat.backend import SatBackend
    from model.sat.device_map import apply_device_map, parse_device_map
    device_map = parse_device_map(args.map)
    devices = sorted({torch.device(d) for d in device_map.devices if d.startswith("cuda")}, key=str)
    rows = {}
    for name in ("cuda:0", args.map):
        gc.collect()
        torch.cuda.empty_cache()
        # what the previous placement left allocated is not this one's (peaks are reported above it)
        base = {d: torch.cuda.memory_allocated(d) for d in devices}
        m = build("cuda:0")
        if name != "cuda:0":
            m = m.cpu()                           # as load_model_and_tokenizer does: place from the CPU
            apply_device_map(m, device_map)
        backend = SatBackend(m)
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)
        logits = prompt_logits(backend, pixels_on(backend.device)).float().cpu()
        answer(backend, 8, pixels_on(backend.device))
        tokens, ttft, tps = answer(backend, args.new_tokens, pixels_on(backend.device))
        rows[name] = dict(logits=logits, tokens=tokens, ttft_s=round(ttft, 4), decode_tokens_per_s=round(tps, 2),
                          peak_gib=[round((torch.cuda.max_memory_allocated(d) - base[d]) / 2 ** 30, 2) for d in devices])
        del m, backend
        torch.cuda.empty_cache()
    a, b = rows.values()
    same = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), len(a["tokens"]))
    print(f"max |logit difference| single GPU vs {args.map}: {(a['logits'] - b['logits']).abs().max().item():.3g}")
    print(f"greedy agreement: {same}/{len(a['tokens'])} tokens")
    for name, row in rows.items():
        print(json.dumps(dict(placement=name, ttft_s=row["ttft_s"], decode_tokens_per_s=row["decode_tokens_per_s"],
                              peak_gib_per_gpu=dict(zip(map(str, devices), row["peak_gib"])))))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    mp = sub.add_parser("mp", help="run under torchrun: mp=N tensor parallel")
    mp.add_argument("--out", default="bench-mp", help="folder for mp<N>.json (mp=N runs compare with mp1.json)")
    mp.add_argument("--new-tokens", type=int, default=256)
    mp.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    dm = sub.add_parser("device-map", help="one process, parts on several GPUs")
    dm.add_argument("--map", default="vision=cuda:0,glm=cuda:0+cuda:1")
    dm.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs CUDA GPUs (the CPU checks are tests/test_model_parallel.py and "
              "tests/test_device_map.py)", file=sys.stderr)
        return 2
    return run_mp(args) if args.command == "mp" else run_device_map(args)


if __name__ == "__main__":
    sys.exit(main())
