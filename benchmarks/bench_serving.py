"""Load benchmark: N concurrent streaming conversations against a live API server.

    python benchmarks/bench_serving.py --model random-7b                  # GPU: starts its own server
    python benchmarks/bench_serving.py --model tiny --levels 1,8 --new-tokens 32    # CPU smoke run
    python benchmarks/bench_serving.py --url http://127.0.0.1:8080 --levels 1,8,64  # any running api.py

Every conversation sends one 224x224 image (as a data URL) and a question to /v1/chat/completions with
stream=true and `--new-tokens` max_tokens, and measures time to first token (TTFT), the gaps between
streamed chunks (inter-token latency, ITL) and the completion tokens from the usage record. Per level N,
all N start together, spread over --clients processes (default 8: one Python process reading 64 streams
lags behind them and measures itself); the table gives aggregate tokens/s (all completion tokens / wall
time), TTFT and ITL p50/p99. --one-client-levels runs levels again from a single client process.
--turns T makes each conversation T turns long: the first turns start together (the burst above), each
follow-up (the conversation so far and the same image again, as chat clients send it) goes as soon as its
conversation's last answer ended, and their TTFT is reported apart, as "later turns": a server's steady
state, where requests come one by one. --min-new-tokens draws each answer's length from a range (the same
lengths in every run), so conversations end, and their next turns come, at different times.

With --model the script starts the server itself (a child process running serving.app on a free port):
`random-7b` is the released architecture with random fp16 weights built on the GPU (as
bench_inference.py builds it) behind the fast backend with continuous batching; `tiny` is the bundled
model. The tokenizer is the bundled model's (the real one is not in the repository); ids it does not
know are decoded modulo its size, which changes nothing in what is measured.
The server runs the model in its own process (serving/engine_process.py, as api.py does on a GPU);
--in-process keeps it on a thread of the server's process, where it shares the GIL with the event loop.
--baseline-levels also runs those levels against the reference path (sat backend, static batching) in
the same run, and the table shows each level's throughput ratio to it. --greedy-check K sends K greedy
conversations one at a time and then all at once, and reports how many answers are identical.
"""
import argparse
import asyncio
import base64
import functools
import io
import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))          # bench_inference (random-7b)

QUESTIONS = ["Describe this picture in detail.", "详细描述这张图片。", "What colours do you see?",
             "图中有几个图形？"]


# -- the server (child process) ----------------------------------------------------------------------
class ModuloDecoding:
    """The bundled tokenizer for a model whose vocabulary is larger: unknown ids decode modulo its size."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        if name.startswith("__"):        # unpickling (the engine process) asks for these before _tok exists
            raise AttributeError(name)
        return getattr(self._tok, name)

    def decode(self, ids):
        # the size once: a property that asks SentencePiece; read for every id it took a fifth of the API
        # process's time under py-spy at 64 streams
        size = self._tok.vocab_size
        return self._tok.decode([i % size for i in ids])

    def streaming_decoder(self):
        return _ModuloStream(self._tok.streaming_decoder(), self._tok.vocab_size)


class _ModuloStream:
    """The tokenizer's streaming decoder for ids taken modulo its size (mapping only the new ones)."""

    def __init__(self, inner, size: int):
        self.inner, self.size, self.ids = inner, size, []

    def decode(self, ids):
        if len(ids) < len(self.ids):
            self.ids = []
        self.ids += [i % self.size for i in ids[len(self.ids):]]
        return self.inner.decode(self.ids)


def build_engine(model_kind: str, backend: str):
    import torch
    from model.chat import ChatEngine
    from model.sat.loading import load_model_and_tokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny, tok = load_model_and_tokenizer("visualglm-tiny", device=device)
    if model_kind == "tiny":
        return ChatEngine(tiny.eval(), tok, allow_image_paths=False, allow_image_urls=False, backend=backend)
    from bench_inference import random_model
    model = random_model(torch.float16)
    return ChatEngine(model, ModuloDecoding(tok), allow_image_paths=False, allow_image_urls=False, backend=backend)


def serve(args) -> None:
    import logging
    import uvicorn
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")   # start-up captures
    from serving.app import create_app
    from serving.engine_process import ProcessWorker
    from serving.worker import Worker
    backend, continuous = ("sat", False) if args.reference else ("fast", True)
    options = dict(max_batch=args.max_batch, max_queue=1024, batch_wait=0.005, continuous=continuous)
    if args.in_process:
        worker = Worker(build_engine(args.model, backend), **options)
    else:
        worker = ProcessWorker(functools.partial(build_engine, args.model, backend), **options)
    app = create_app(worker, model_name=args.model, metrics_public=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def start_server(args, reference: bool):
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", "--model", args.model, "--port", str(port),
           "--max-batch", str(args.max_batch)] + (["--reference"] if reference else []) + \
          (["--in-process"] if args.in_process else [])
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("the server did not become ready in 15 minutes")


# -- the client ---------------------------------------------------------------------------------------
# every conversation's image is new to the server (its image cache would otherwise serve a level the images
# of the last one): seeds count up from the start time, in milliseconds
_image_seeds = itertools.count(int(time.time() * 1000))


def image_url(seed: int) -> str:
    """A 224x224 PNG data URL; its first six pixels spell out the seed, so no two seeds give one image."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (224, 224), ((seed * 70) % 256, 200, 120))
    ImageDraw.Draw(img).ellipse([40 + seed % 30, 40, 180, 170], fill=(200, (seed * 40) % 256, 30))
    for k in range(6):
        img.putpixel((k, 0), ((seed >> 8 * k) & 255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


FOLLOW_UPS = ["Tell me more about it.", "还有什么细节？"]


def request_body(i: int, new_tokens: int, greedy: bool = False, image: Optional[str] = None,
                 answers: Sequence[str] = ()) -> bytes:
    """Conversation i's request, as the bytes sent: its first question and image (a new one unless given),
    or, after `answers` (the conversation's answers so far), its next follow-up with the whole conversation
    and the same image again, as OpenAI clients send it. First turns are built before a level starts:
    encoding 64 PNGs and their JSON inside the level would stagger the arrivals by the client's own CPU time."""
    image = image or image_url(next(_image_seeds))
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
                                             {"type": "image_url", "image_url": {"url": image}}]}]
    for k, answer in enumerate(answers):
        messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": FOLLOW_UPS[(i + k) % len(FOLLOW_UPS)]})
    body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": new_tokens,
            "messages": messages}
    if greedy:
        body["temperature"] = 0
    return json.dumps(body).encode()


def answer_lengths(i: int, turns: int, low: int, high: int) -> list:
    """max_tokens of conversation i's turns: drawn from [low, high], the same in every run."""
    rng = random.Random(i)
    return [rng.randint(low, high) for _ in range(turns)]


async def conversation(client, url: str, body: bytes) -> dict:
    """One streamed answer: when its headers came (started), its first token (ttft), the gaps between
    chunks, its completion tokens and text."""
    start = time.perf_counter()
    first, last, gaps, text, tokens = None, None, [], [], 0
    async with client.stream("POST", url + "/v1/chat/completions", content=body,
                             headers={"Content-Type": "application/json"}) as r:
        started = time.perf_counter() - start         # the server queued the request and began the answer
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            content = (chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None)
            if content:
                now = time.perf_counter()
                if first is None:
                    first = now - start
                else:
                    gaps.append(now - last)
                last = now
                text.append(content)
    return dict(ttft=first, started=started, gaps=gaps, tokens=tokens, text="".join(text), done_at=time.time())


async def dialogue(client, url: str, i: int, image: str, first_body: bytes, lengths: list) -> list:
    """Conversation i: its first turn (first_body, with `image`), then each follow-up as soon as the last
    answer ended, with the conversation so far and the same image. -> one conversation() record per turn."""
    records = []
    for turn, new_tokens in enumerate(lengths):
        answers = [r["text"] for r in records]
        body = first_body if turn == 0 else request_body(i, new_tokens, image=image, answers=answers)
        records.append(dict(await conversation(client, url, body), turn=turn))
    return records


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def cpu_seconds(pid: int) -> dict:
    """CPU seconds (user + system) so far of process `pid` ("api") and of its children together ("model":
    the engine process, beside an idle resource tracker), from Linux's /proc; {} elsewhere. A level's
    growth over its wall time says how busy each was: the API process runs on one core (one GIL)."""
    def stat(p):
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()          # after the name: state, ppid, ...
    try:
        tick = os.sysconf("SC_CLK_TCK")
        own = stat(pid)
        children = 0.0
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = stat(entry)
                except OSError:                                # ended meanwhile
                    continue
                if int(fields[1]) == pid:
                    children += (int(fields[11]) + int(fields[12])) / tick
        return {"api": (int(own[11]) + int(own[12])) / tick, "model": children}
    except (OSError, ValueError, IndexError):
        return {}


# per-request histograms of the server (serving/metrics.py); its time to first token runs from queueing to
# the first token reaching the HTTP side, so the client's TTFT minus it is parsing before and streaming after
WAITS = ("request_prepare", "queue_wait", "handoff", "time_to_first_token")


async def server_steps(client, url: str) -> dict:
    """Sum and count of the server's model-thread time per phase (visualglm_batch_step_seconds), and the
    cumulative buckets of its per-request waits: {(phase, "sum"|"count"): v, (wait, le): count}."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    text = (await client.get(url + "/metrics")).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("visualglm_batch_step_seconds_sum", "visualglm_batch_step_seconds_count"):
                out[(s.labels["phase"], s.name.rsplit("_", 1)[1])] = s.value
            for wait in WAITS:
                if s.name == f"visualglm_{wait}_seconds_bucket":
                    out[(wait, float(s.labels["le"]))] = s.value
                elif s.name in (f"visualglm_{wait}_seconds_sum", f"visualglm_{wait}_seconds_count"):
                    out[(wait, s.name.rsplit("_", 1)[1])] = s.value
    return out


def wait_summary(before: dict, after: dict, wait: str) -> dict:
    """Mean and the bucket bound under which 99% of a level's waits fell (ms), from the histogram's growth."""
    count = after.get((wait, "count"), 0) - before.get((wait, "count"), 0)
    if not count:
        return {}
    mean = (after[(wait, "sum")] - before.get((wait, "sum"), 0)) / count
    bounds = sorted(k[1] for k in after if k[0] == wait and isinstance(k[1], float))
    p99 = next(le for le in bounds if after[(wait, le)] - before.get((wait, le), 0) >= 0.99 * count)
    return {f"{wait}_mean_ms": round(mean * 1e3, 1), f"{wait}_p99_under_ms": p99 * 1e3}


def _client(url: str, conversations: list, ready, go, results) -> None:
    """One client process: its share of a level's conversations [(i, image, first body, lengths)], started
    when the parent says go."""
    async def main():
        import httpx
        size = len(conversations) + 8
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        async with httpx.AsyncClient(timeout=None, limits=limits, trust_env=False) as client:
            await client.get(url + "/health")    # httpx imports and sets up on its first request: not timed
            ready.put(True)
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            done = await asyncio.gather(*(dialogue(client, url, *c) for c in conversations))
            return [record for records in done for record in records]
    try:
        results.put(asyncio.run(main()))
    except Exception as e:  # noqa: BLE001 - reported by the parent
        results.put(repr(e))


def run_level(url: str, n: int, new_tokens: int, clients: int = 1, server_pid: Optional[int] = None,
              turns: int = 1, min_new_tokens: Optional[int] = None) -> dict:
    """N conversations that start together, spread over `clients` processes: one Python process parsing
    the streams of 64 conversations (thousands of chunks a second) lags behind them, and then measures
    itself, not the server. Each conversation has `turns` turns of max_tokens drawn from [min_new_tokens,
    new_tokens]; first turns arrive together (a burst), later ones whenever their conversation's last
    answer ended, and their TTFT is reported apart ("later turns")."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    lengths = [answer_lengths(i, turns, min_new_tokens or new_tokens, new_tokens) for i in range(n)]
    images = [image_url(next(_image_seeds)) for _ in range(n)]
    conversations = [(i, images[i], request_body(i, lengths[i][0], image=images[i]), lengths[i])
                     for i in range(n)]
    before = asyncio.run(_steps(url))
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    share = [conversations[k::clients] for k in range(min(clients, n))]
    procs = [ctx.Process(target=_client, args=(url, part, ready, go, out), daemon=True) for part in share]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    cpu_before = cpu_seconds(server_pid) if server_pid else {}
    start = time.time()
    go.set()
    parts = [out.get() for _ in procs]
    for proc in procs:
        proc.join(30)
    failed = [p for p in parts if isinstance(p, str)]
    if failed:
        raise RuntimeError(f"a client failed: {failed[0]}")
    results = [r for part in parts for r in part]
    wall = max(r["done_at"] for r in results) - start
    cpu_after = cpu_seconds(server_pid) if server_pid else {}
    time.sleep(0.3)                           # the engine process reports its step times every 0.1 s
    after = asyncio.run(_steps(url))
    phases = {}
    for phase in ("images", "admit", "decode", "send"):
        count = after.get((phase, "count"), 0) - before.get((phase, "count"), 0)
        total = after.get((phase, "sum"), 0) - before.get((phase, "sum"), 0)
        phases[f"{phase}_ms"] = round(total / count * 1e3, 2) if count else None
        phases[f"{phase}_n"] = int(count)
    for wait in WAITS:
        phases.update(wait_summary(before, after, wait))
    for part in cpu_after:                 # cores kept busy over the level (1.0: one core all the time)
        phases[f"{part}_cpu"] = round((cpu_after[part] - cpu_before[part]) / wall, 2)
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    out = dict(n=n, clients=len(procs), turns=turns, answers=len(results), tokens=tokens, seconds=wall,
               tok_s=tokens / wall, itl_p50=pct(gaps, 0.5) * 1e3, itl_p99=pct(gaps, 0.99) * 1e3, server=phases)
    for prefix, later in (("", False), ("later_", True)):
        group = [r for r in results if bool(r["turn"]) == later]
        if group:
            ttft = [r["ttft"] for r in group if r["ttft"] is not None]
            started = [r["started"] for r in group]
            out.update({f"{prefix}ttft_p50": pct(ttft, 0.5) * 1e3, f"{prefix}ttft_p99": pct(ttft, 0.99) * 1e3,
                        f"{prefix}started_p50": pct(started, 0.5) * 1e3,
                        f"{prefix}started_p99": pct(started, 0.99) * 1e3})
    return out


async def _steps(url: str) -> dict:
    import httpx
    async with httpx.AsyncClient(timeout=None, trust_env=False) as client:
        return await server_steps(client, url)


async def greedy_check(url: str, k: int, new_tokens: int) -> tuple:
    import httpx
    async with httpx.AsyncClient(timeout=None, trust_env=False) as client:
        bodies = [request_body(i, new_tokens, greedy=True) for i in range(k)]
        alone = [(await conversation(client, url, body))["text"] for body in bodies]
        together = await asyncio.gather(*(conversation(client, url, body) for body in bodies))
    same = sum(a == b["text"] for a, b in zip(alone, together))
    return same, k


def engine_level(engine, slots, n: int, new_tokens: int) -> dict:
    """The continuous batch driven directly (no HTTP): n requests admitted at once, decoded to the end."""
    import torch
    from model.continuous import ContinuousBatch
    from model.sampling import SamplingParams
    from PIL import Image
    batch = ContinuousBatch(slots, engine.tokenizer.pad_token_id, [])
    emb = engine.encode_images([engine.pixels(Image.new("RGB", (224, 224), (i, 100, 50))) for i in range(n)])
    params = SamplingParams(max_length=2048, top_p=0.4, top_k=100, temperature=0.8, max_new_tokens=new_tokens)
    requests = [engine.make_request(QUESTIONS[i % 4], [], emb[i], False, params) for i in range(n)]
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    batch.admit(requests)
    first = time.perf_counter()
    steps = 0
    while batch.running:
        batch.step()
        steps += 1
    wall = time.perf_counter() - start
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    index = [len(requests[0].ids) + new_tokens // 2] * n          # the forward pass alone, mid-answer
    slots.decode([5] * n, [(1, 2)] * n, index)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        slots.decode([5] * n, [(1, 2)] * n, index)
    sync()
    return dict(n=n, prefill_ms=(first - start) * 1e3, step_ms=(wall - (first - start)) / max(steps, 1) * 1e3,
                forward_ms=(time.perf_counter() - t) / 10 * 1e3, tok_s=n * new_tokens / wall)


def engine_only(args) -> None:
    """--engine-only: the decode loop's own speed, without the server, for each level."""
    from model.backend import open_slots
    engine = build_engine(args.model, "fast")
    levels = [int(x) for x in args.levels.split(",") if x]
    slots = open_slots(engine.backend, max(levels))
    levels = [n for n in levels if n <= slots.slots]
    engine_level(engine, slots, max(levels), 8)                  # warm-up: captures the graphs
    for n in levels:
        print(json.dumps(engine_level(engine, slots, n, args.new_tokens)), flush=True)


def table(rows, baseline) -> str:
    # "answer started": until the response headers came, i.e. the server had parsed and queued the request
    # "later turns": follow-ups, each sent when its conversation's last answer ended (--turns)
    lines = ["| N | tokens | seconds | tokens/s | vs reference | TTFT p50 ms | TTFT p99 ms "
             "| answer started p50 / p99 ms | later turns: TTFT p50 / p99 ms | ITL p50 ms | ITL p99 ms "
             "| API / model process cores |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def started(r):
        return f"{r['started_p50']:.0f} / {r['started_p99']:.0f}" if "started_p50" in r else "-"

    def later(r):
        return f"{r['later_ttft_p50']:.0f} / {r['later_ttft_p99']:.0f}" if "later_ttft_p50" in r else "-"

    def cores(r):
        server = r.get("server", {})
        return f"{server['api_cpu']:.2f} / {server['model_cpu']:.2f}" if "api_cpu" in server else "-"
    for r in rows:
        ref = baseline.get(r["n"])
        ratio = f"{r['tok_s'] / ref['tok_s']:.1f}x" if ref else "-"
        lines.append(f"| {r['n']} | {r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:.0f} | {ratio} | "
                     f"{r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | {started(r)} | {later(r)} | {r['itl_p50']:.1f} "
                     f"| {r['itl_p99']:.1f} | {cores(r)} |")
    for n, r in sorted(baseline.items()):
        lines.append(f"| {n} (reference: sat, static batching) | {r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:.0f} "
                     f"| 1.0x | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | {started(r)} | {later(r)} "
                     f"| {r['itl_p50']:.1f} | {r['itl_p99']:.1f} | {cores(r)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one with --model)")
    p.add_argument("--model", choices=["random-7b", "tiny"], default="random-7b")
    p.add_argument("--levels", default="1,8,32,64,128", help="concurrent conversations per level")
    p.add_argument("--new-tokens", type=int, default=256, help="max_tokens of each answer")
    p.add_argument("--min-new-tokens", type=int, default=None,
                   help="draw each answer's max_tokens from [this, --new-tokens] (default: all --new-tokens)")
    p.add_argument("--turns", type=int, default=1,
                   help="turns per conversation: each follow-up is sent when the last answer ended (default 1)")
    p.add_argument("--max-batch", type=int, default=128, help="the server's --max-batch (slots)")
    p.add_argument("--baseline-levels", default="", help="levels to run on the reference path too, e.g. 64")
    p.add_argument("--greedy-check", type=int, default=0, metavar="K")
    p.add_argument("--clients", type=int, default=8, help="client processes the conversations are spread over")
    p.add_argument("--one-client-levels", default="", help="levels to run again from one client process, e.g. 64")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--in-process", action="store_true",
                   help="run the model on a thread of the server's process (default: in its own process)")
    p.add_argument("--engine-only", action="store_true",
                   help="drive the continuous batch in this process, without the server (its own speed)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.turns < 1 or args.new_tokens < 1 or not 1 <= (args.min_new_tokens or 1) <= args.new_tokens:
        p.error("--turns and --new-tokens must be at least 1, --min-new-tokens between 1 and --new-tokens")
    if args.serve:
        return serve(args)
    if args.engine_only:
        return engine_only(args)
    levels = [int(x) for x in args.levels.split(",") if x]
    procs, results = [], {"levels": [], "baseline": {}, "greedy": None}
    try:
        url, pid = args.url, None
        if url is None:
            proc, url = start_server(args, reference=False)
            procs.append(proc)
            pid = proc.pid
        # warm-up (first connections, allocator): the server captured every CUDA graph at start-up
        # (FastSlots.warm_up), so no level, N=1 included, waits for a capture
        run_level(url, max(levels), 8, args.clients)
        for n in levels:
            r = run_level(url, n, args.new_tokens, args.clients, pid, args.turns, args.min_new_tokens)
            print(json.dumps(r), flush=True)
            results["levels"].append(r)
        for n in [int(x) for x in args.one_client_levels.split(",") if x]:
            r = run_level(url, n, args.new_tokens, 1)
            print("one client process", json.dumps(r), flush=True)
            results.setdefault("one_client", []).append(r)
        if args.greedy_check:
            same, k = asyncio.run(greedy_check(url, args.greedy_check, args.new_tokens))
            results["greedy"] = dict(identical=same, of=k)
        base_levels = [int(x) for x in args.baseline_levels.split(",") if x]
        if base_levels:
            for proc in procs:
                proc.terminate()
                proc.wait(60)
            procs = []
            proc, ref_url = start_server(args, reference=True)
            procs.append(proc)
            for n in base_levels:
                r = run_level(ref_url, n, args.new_tokens, args.clients, None, args.turns, args.min_new_tokens)
                print("reference", json.dumps(r), flush=True)
                results["baseline"][n] = r
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print()
    where = "on a thread of the server (--in-process)" if args.in_process else "in its own process"
    tokens = f"{args.min_new_tokens}-{args.new_tokens}" if args.min_new_tokens else f"{args.new_tokens}"
    turns = f"{args.turns} turns" if args.turns > 1 else "one turn"
    print(f"{args.model}, {tokens} new tokens per answer, {turns} per conversation, one 224x224 image each, "
          f"model {where}")
    print(table(results["levels"], results["baseline"]))
    if results["greedy"]:
        g = results["greedy"]
        print(f"greedy answers identical alone and under load: {g['identical']}/{g['of']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
