"""Command-line plumbing shared by api.py, web_demo.py (and their Hugging Face twins): model flags,
the loader that builds a chat engine, and running the HTTP server with the model loading behind it."""
import argparse
import functools
import logging
import os
import sys
import threading
from pathlib import Path

from model.defaults import BACKEND_HELP, BACKENDS, DEMO_SAMPLING, SERVER_MAX_IMAGE_BYTES, SERVER_MAX_IMAGE_PIXELS

log = logging.getLogger("visualglm.serving")
DEVICE_MAP_HELP = ("put the image encoder and the GLM layers on different devices, e.g. vision=cuda:0,glm=cuda:1 "
                   "or glm=cuda:0+cuda:1 (layers split evenly) or glm=cuda:0*10+cuda:1*18; see docs/multi-gpu.md")


def _flag(parser, name, **kw):
    """--some-flag, also accepted as --some_flag (the original scripts use underscores)."""
    names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    return parser.add_argument(*names, **kw)


def add_model_args(parser: argparse.ArgumentParser, default_model: str = "visualglm-6b") -> None:
    g = parser.add_argument_group("model")
    _flag(g, "--from_pretrained", default=default_model, help="checkpoint name (in $SAT_HOME) or folder")
    _flag(g, "--quant", type=int, choices=[4, 8], default=None, help="quantize the GLM weights to 8 or 4 bits")
    _flag(g, "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    _flag(g, "--tokenizer", default=None, help="folder with ice_text.model (default: found automatically)")
    _flag(g, "--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    _flag(g, "--device-map", default=None, help=DEVICE_MAP_HELP)


def add_sampling_args(parser: argparse.ArgumentParser, defaults: dict = DEMO_SAMPLING) -> None:
    """The sampling flags of the terminal chat and of batch inference (infer.py)."""
    d = defaults
    parser.add_argument("--max_length", type=int, default=d["max_length"], help="max length of prompt + answer, in tokens")
    parser.add_argument("--top_p", type=float, default=d["top_p"], help="top p for nucleus sampling")
    parser.add_argument("--top_k", type=int, default=d["top_k"], help="top k for top-k sampling (1 = greedy)")
    parser.add_argument("--temperature", type=float, default=d["temperature"], help="temperature for sampling (0 = greedy)")
    parser.add_argument("--repetition_penalty", type=float, default=d["repetition_penalty"])


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("batching and queue")
    _flag(g, "--max-batch", type=int, default=8, help="most requests generated together in one batch")
    _flag(g, "--max-queue", type=int, default=32,
          help="most requests waiting while a batch runs; beyond that new ones are refused (API: 503)")
    _flag(g, "--batch-wait-ms", type=float, default=10.0,
          help="static batching: how long an idle worker waits for more requests before starting a batch "
               "(continuous batching admits each request as soon as the model is free)")
    _flag(g, "--batching", choices=["auto", "continuous", "static"], default="auto",
          help="continuous: requests join and leave the running batch at every step (fast backend only); "
               "static: a batch runs to its longest answer; auto: continuous when the backend can")
    _flag(g, "--gpu-memory-fraction", type=float, default=0.9,
          help="share of the GPU's memory for weights plus the key/value slots of continuous batching "
               "(fewer than --max-batch slots when that is too little)")


def worker_options(args) -> dict:
    continuous = {"auto": None, "continuous": True, "static": False}[args.batching]
    return dict(max_batch=args.max_batch, max_queue=args.max_queue, batch_wait=args.batch_wait_ms / 1000.0,
                continuous=continuous, gpu_memory_fraction=args.gpu_memory_fraction)


def sat_engine_loader(from_pretrained: str, device=None, quant=None, tokenizer=None, backend: str = "auto",
                      device_map=None):
    """A callable that loads a sat checkpoint and returns a ChatEngine that refuses image paths and URLs
    (servers take images only as data; the API fetches URLs itself when the operator allows it).
    Picklable, so that the engine process (serving/engine_process.py) can call it."""
    return functools.partial(_load_sat_engine, from_pretrained, device, quant, tokenizer, backend, device_map)


def _load_sat_engine(from_pretrained, device, quant, tokenizer, backend, device_map):
    from model.chat import ChatEngine
    from model.sat.checkpoint import CheckpointError
    from model.sat.loading import load_model_and_tokenizer

    from model.sat.device_map import backend_for

    from .errors import ModelLoadError
    try:
        model, tok = load_model_and_tokenizer(from_pretrained, device=device, quant=quant, tokenizer=tokenizer,
                                              device_map=device_map, backend=backend)
        kind = backend_for(device_map, backend)
    except CheckpointError as e:   # says what is wrong and where it looked: no traceback needed
        raise ModelLoadError(str(e)) from None
    model.eval()
    return ChatEngine(model, tok, allow_image_paths=False, allow_image_urls=False, backend=kind)


def add_hf_model_args(parser: argparse.ArgumentParser, default_model: str = "THUDM/visualglm-6b") -> None:
    """The *_hf.py front ends' model flags: a Hugging Face folder, no sat quantization or backend choice."""
    g = parser.add_argument_group("model")
    _flag(g, "--from_pretrained", default=default_model,
          help="Hugging Face model folder (python -m model.convert sat-to-hf writes one) or cached Hub name")
    _flag(g, "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    _flag(g, "--tokenizer", default=None, help="folder with ice_text.model (default: the model folder)")


def hf_engine_loader(from_pretrained: str, device=None, tokenizer=None):
    """Like sat_engine_loader, for a Hugging Face folder (model/hf); sat is not needed."""
    return functools.partial(_load_hf_engine, from_pretrained, device, tokenizer)


def _load_hf_engine(from_pretrained, device, tokenizer):
    from model.chat import ChatEngine
    from model.hf import HFBackend
    from model.hf.loading import HFLoadError, load_hf_model_and_tokenizer

    from .errors import ModelLoadError
    try:
        model, tok = load_hf_model_and_tokenizer(from_pretrained, device=device, tokenizer=tokenizer)
    except HFLoadError as e:
        raise ModelLoadError(str(e)) from None
    return ChatEngine(HFBackend(model), tok, allow_image_paths=False, allow_image_urls=False)


def model_name_of(from_pretrained: str) -> str:
    return Path(str(from_pretrained).rstrip("/")).name or "visualglm-6b"


def add_api_args(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--host", default="0.0.0.0", help="address to listen on (127.0.0.1: this machine only)")
    _flag(parser, "--port", type=int, default=8080)
    _flag(parser, "--model-name", default=None, help="model id reported by /v1/models (default: checkpoint name)")
    g = parser.add_argument_group("limits and security")
    _flag(g, "--allow-remote-images", action="store_true",
          help="fetch http(s) image URLs sent by clients (off: only inline base64 / data: URLs)")
    _flag(g, "--allow-private-image-hosts", action="store_true",
          help="with --allow-remote-images, also fetch from loopback / private / link-local addresses")
    _flag(g, "--max-image-bytes", type=int, default=SERVER_MAX_IMAGE_BYTES, help="largest image accepted (413 above)")
    _flag(g, "--max-image-pixels", type=int, default=SERVER_MAX_IMAGE_PIXELS,
          help="largest width x height accepted, checked before decoding (decompression bombs)")
    _flag(g, "--api-key", default=os.environ.get("VISUALGLM_API_KEY"),
          help="require 'Authorization: Bearer KEY' on POST endpoints (default: $VISUALGLM_API_KEY, unset: open)")
    _flag(g, "--cors-origin", action="append", default=[], help="allow browser calls from this origin (repeatable)")
    _flag(g, "--metrics-public", action="store_true", help="serve GET /metrics without the API key")
    _flag(parser, "--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _flag(parser, "--engine-process", choices=["auto", "on", "off"], default="auto",
          help="run the model in its own process, so that the HTTP side never holds up its decode steps "
               "(they share Python's GIL otherwise); auto: on when the model runs on CUDA")


def run_api(args, loader) -> int:
    """Start uvicorn at once (so /health answers 503 while loading); load the model on the worker
    thread; exit with status 1 if loading fails."""
    import uvicorn
    from .app import create_app
    from .engine_process import LOG_FORMAT, ProcessWorker, engine_process_wanted
    from .worker import Worker

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if engine_process_wanted(args.engine_process, getattr(args, "device", None)):
        worker = ProcessWorker(loader, **worker_options(args))
    else:
        worker = Worker(loader=loader, **worker_options(args))
    app = create_app(worker, model_name=args.model_name or model_name_of(args.from_pretrained),
                     allow_remote_images=args.allow_remote_images,
                     allow_private_image_hosts=args.allow_private_image_hosts,
                     max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                     api_key=args.api_key, cors_origins=args.cors_origin, metrics_public=args.metrics_public)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    failed = threading.Event()

    def watch_loading():
        if not worker.wait_ready() and worker.state == "failed":
            print(f"error: could not load the model: {worker.error}", file=sys.stderr)
            failed.set()
            server.should_exit = True
    threading.Thread(target=watch_loading, daemon=True).start()
    server.run()
    return 1 if failed.is_set() else 0
