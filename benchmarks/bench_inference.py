"""Inference benchmark: the full-size VisualGLM-6B architecture with random weights, built on the GPU.

    python benchmarks/bench_inference.py                          # every variant, a table at the end
    python benchmarks/bench_inference.py --variants sat-fp16,fast-fp16 --new-tokens 256
    python benchmarks/bench_inference.py --variants load-int4,load-int8  # --quant's loading path

Each variant runs in its own process (so peak memory is its own): it builds the model from the released
config (model/configs.py) with random weights directly on the GPU (no download), then answers one
224x224 image + a short question with `--new-tokens` forced new tokens (eos ignored), sampling with
top_p 0.4 / top_k 100 / temperature 0.8, batch 1, through the chat core's generate(). Reported:
time to first token and its two parts ("image ms": encoding the image; "prefill ms": prefill and the
first sample), decode tokens/s after the first token, peak GPU memory, achieved GB/s (GLM + LM-head weight bytes read per step x tokens/s) and the fraction of
the copy bandwidth measured in the same run, and the ratio to the reference (sat-fp16).
load-int8 / load-int4 take the loader's --quant path (model/fast/load.py): the random model is moved to
the CPU first, as a checkpoint is read there, then each GLM matrix is quantized onto the GPU; "load GiB"
is the peak GPU memory of that loading.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("sat-fp16", "fast-fp16", "fast-bf16", "fast-int8", "fast-int4")
LOAD_VARIANTS = ("load-int8", "load-int4")                # not in the default run: each moves 15 GB to the CPU


def copy_bandwidth() -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written (median of 20)."""
    import torch
    src = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / sorted(times[5:])[len(times[5:]) // 2] / 1e9


def random_model(dtype):
    """The released architecture with random weights (std 0.02, LayerNorms at 1 / 0), on the GPU."""
    import torch
    from model.configs import VISUALGLM_6B
    from model.sat.checkpoint import build_model
    m = build_model(VISUALGLM_6B, device="cuda", dtype=dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.data = p.data.to(dtype)       # as the loader stores every weight (the ViT's conv is built in fp32)
            if "layernorm" in name or "ln_vision" in name or name.endswith("norm.weight"):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0, 0.02, generator=g)
    m.config = dict(VISUALGLM_6B)
    return m.eval()


def weight_bytes(glm) -> int:
    """Bytes of weights one decode step reads: every GLM layer's linears and the LM head."""
    total = 0
    for module in list(glm.blocks.modules()) + [glm.lm_head]:
        for name, t in module.named_buffers(recurse=False):
            total += t.numel() * t.element_size()
        for name, t in module.named_parameters(recurse=False):
            total += t.numel() * t.element_size()
    return total


def run_variant(name: str, new_tokens: int) -> dict:
    import torch
    from model.generation import Request, generate
    from model.sampling import SamplingParams
    path, kind = name.split("-")
    dtype = torch.bfloat16 if kind == "bf16" else torch.float16
    bits = {"int8": 8, "int4": 4}.get(kind)
    model = random_model(dtype)
    load_gib = None
    if path == "sat":
        from model.sat.backend import SatBackend
        backend, glm = SatBackend(model), None
    elif path == "load":
        from model.fast.load import quantize_onto
        model.to("cpu")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        backend = quantize_onto(model, bits, "cuda")
        load_gib = torch.cuda.max_memory_allocated() / 2 ** 30
        glm = backend.glm
    else:
        from model.fast import FastBackend
        backend = FastBackend(model, quant=bits)
        glm = backend.glm
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    L, gmask, sop = model.image_length, model.config["gmask_token_id"], model.config["bos_token_id"]
    ids = [20, 21] + [3] * L + list(range(100, 120)) + [gmask, sop]           # "<img>" + image + question
    params = SamplingParams(max_length=len(ids) + new_tokens + 1, max_new_tokens=new_tokens, top_p=0.4,
                            top_k=100, temperature=0.8, repetition_penalty=1.0)
    pixels = torch.randn(1, 3, 224, 224, device="cuda")

    def answer():
        torch.cuda.synchronize()
        start = time.perf_counter()
        emb = backend.encode_image(pixels)[0]
        torch.cuda.synchronize()
        encoded = time.perf_counter()
        stamps = []
        for _ in generate(backend, [Request(ids=ids, params=params, image_embeds=emb, pre_image=2)], 3, []):
            stamps.append(time.perf_counter())
        return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps), encoded - start

    answer()                                                         # warm-up: graphs, kernels, caches
    torch.cuda.reset_peak_memory_stats()
    runs = sorted(answer() for _ in range(3))
    ttft, _, tokens, image = runs[1]                                 # the median time to first token
    tps = sorted(r[1] for r in runs)[1]
    out = dict(variant=name, ttft_ms=ttft * 1e3, image_ms=image * 1e3, prefill_ms=(ttft - image) * 1e3,
               tokens_per_s=tps, tokens=tokens, peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
               load_gib=load_gib)
    graph = getattr(backend, "_graph", None)
    if graph is not None:                       # the captured step alone, without sampling and Python
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.graph.replay()
        end.record()
        torch.cuda.synchronize()
        out["graph_step_ms"] = start.elapsed_time(end) / 50
    if glm is not None:
        out["weight_gb"] = weight_bytes(glm) / 1e9
    else:
        from model.fast.glm import FastGLM
        out["weight_gb"] = weight_bytes(FastGLM(model)) / 1e9      # shares the tensors: nothing copied
    return out


# A kernel check above this relative error is flagged: the kernels land near 2e-4 (int8) and 4e-4 (int4,
# fp16 pair sums); a wrong product is near 1.
KERNEL_ERROR_LIMIT = 1e-2
# The fast path's greedy tokens must agree with the sat path's on at least this share (the target).
GREEDY_AGREEMENT = 0.95


def check_kernels() -> list:
    """The GPU kernels against their dequantized weights on random data: relative error per layer shape."""
    import torch
    from model.fast.quant import Int4Linear, Int8Linear
    from model.quant import dequantize
    rows = []
    for n, k in ((12288, 4096), (4096, 16384), (130528, 4096)):
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        for m in (1, 4, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            q8 = Int8Linear(w, None)
            ref8 = x.float() @ dequantize(q8.qweight, q8.scale, 8, torch.float32).T
            q4 = Int4Linear(w, None)
            ref4 = x.float() @ q4.dequantized(torch.float32).T              # unpacked by torch, not the kernel
            rows.append(dict(shape=f"{m}x{k} @ {k}x{n}",
                             int8=((q8(x).float() - ref8).norm() / ref8.norm()).item(),
                             int4=((q4(x).float() - ref4).norm() / ref4.norm()).item()))
    return rows


def greedy_agreement(new_tokens: int) -> list:
    """The bundled model in fp16 on the GPU: greedy tokens of the fast path against the sat path, a few
    prompts with an image, eos ignored. Returns, per prompt, the length of the common prefix."""
    import torch
    from model.chat import ChatEngine
    from model.fast import FastBackend
    from model.generation import generate
    from model.prompts import has_chinese
    from model.sampling import SamplingParams
    from model.sat.backend import SatBackend
    from model.sat.loading import load_model_and_tokenizer
    model, tok = load_model_and_tokenizer("visualglm-tiny", device="cuda", dtype=torch.float16)
    out = []
    for image, question in (("1.png", "描述这张图片。"), ("2.png", "What colour is the square?"),
                            ("3.png", "图中有几个图形？"), ("4.png", "Describe the image.")):
        runs = []
        for backend in (SatBackend(model), FastBackend(model)):
            engine = ChatEngine(backend, tok)
            emb = engine.encode_image(str(ROOT / "examples" / image))
            request = engine.make_request(question, [], emb, not has_chinese(question),
                                          SamplingParams(top_k=1, max_length=2048, max_new_tokens=new_tokens))
            runs.append([st[0] for st in generate(backend, [request], tok.pad_token_id, [])])
        same = next((i for i, (a, b) in enumerate(zip(*runs)) if a != b), len(runs[0]))
        out.append(dict(image=image, tokens=len(runs[0]), common_prefix=same))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS + LOAD_VARIANTS)} (default: all but load-*)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--one", help=argparse.SUPPRESS)                  # run one variant (child process)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--check", action="store_true",
                   help="first check the kernels and fast-vs-sat greedy agreement (a failed check is marked WRONG "
                        "and the exit status is 1)")
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args.new_tokens)), flush=True)
        return 0
    import torch
    if not torch.cuda.is_available():
        print("This benchmark needs an NVIDIA GPU (it builds the 7.8B model on it).", file=sys.stderr)
        return 2
    bandwidth = copy_bandwidth()
    checks_failed = False
    if args.check:
        for row in check_kernels():
            wrong = [kind for kind in ("int8", "int4") if not row[kind] <= KERNEL_ERROR_LIMIT]     # NaN too
            print(f"kernel check {row['shape']:>24}: int8 rel. error {row['int8']:.2e}, int4 {row['int4']:.2e}"
                  + (f"  WRONG: {', '.join(wrong)} above {KERNEL_ERROR_LIMIT:g}" if wrong else ""))
            checks_failed |= bool(wrong)
        for row in greedy_agreement(args.new_tokens):
            low = row["common_prefix"] < GREEDY_AGREEMENT * row["tokens"]
            print(f"greedy agreement {row['image']}: {row['common_prefix']}/{row['tokens']} tokens identical "
                  f"before the first difference" + (f"  WRONG: below {GREEDY_AGREEMENT:.0%}" if low else ""))
            checks_failed |= low
    results = []
    for name in [v for v in args.variants.split(",") if v]:          # --variants "": checks only
        done = subprocess.run([sys.executable, __file__, "--one", name, "--new-tokens", str(args.new_tokens)],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            results.append(dict(variant=name, error=done.stderr.strip().splitlines()[-1:]))
            continue
        results.append(json.loads(lines[0][len("RESULT "):]))
        print(f"{name}: {lines[0][len('RESULT '):]}", file=sys.stderr, flush=True)
    ref = next((r for r in results if r["variant"] == "sat-fp16" and "error" not in r), None)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  copy bandwidth {bandwidth:.0f} GB/s  "
          f"new tokens {args.new_tokens}")
    print(f"{'variant':<10} {'TTFT ms':>8} {'image ms':>8} {'prefill ms':>10} {'tok/s':>8} {'x ref':>6} "
          f"{'peak GiB':>9} {'load GiB':>8} {'weights GB':>10} {'GB/s':>7} {'of limit':>8} {'graph ms':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<10} failed: {r['error']}")
            continue
        gbs = r["weight_gb"] * r["tokens_per_s"]
        ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
        r.update(gb_per_s=gbs, fraction_of_copy=gbs / bandwidth, ratio_to_ref=ratio)
        load = r.get("load_gib") or float("nan")
        print(f"{r['variant']:<10} {r['ttft_ms']:>8.1f} {r['image_ms']:>8.1f} {r['prefill_ms']:>10.1f} "
              f"{r['tokens_per_s']:>8.1f} {ratio:>6.1f} {r['peak_gib']:>9.2f} {load:>8.2f} "
              f"{r['weight_gb']:>10.2f} {gbs:>7.0f} {gbs / bandwidth:>8.2f} {r.get('graph_step_ms', float('nan')):>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(bandwidth_gb_s=bandwidth, gpu=torch.cuda.get_device_name(),
                                                   torch=torch.__version__, results=results), indent=2))
    if checks_failed:
        print("a check failed (WRONG above): the numbers of the variants it concerns are not valid results",
              file=sys.stderr)
    return 1 if checks_failed else 0


if __name__ == "__main__":
    sys.exit(main())
