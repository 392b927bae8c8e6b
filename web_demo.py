"""The VisualGLM-6B web demo (Gradio 6, sat checkpoints).

    python web_demo.py --from_pretrained visualglm-6b            # http://0.0.0.0:7860
    python web_demo.py --quant 4 --port 8000 --share

Upload an image, ask questions, watch the answer stream in; temperature / top-p / maximum length
controls; Clear starts over. Concurrent visitors are batched on one model (see docs/serving.md).
"""
import argparse
import os
import sys

from serving.cli import add_model_args, add_worker_args, model_name_of, sat_engine_loader, worker_options


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also publish a temporary public link through Gradio")
    add_worker_args(p)
    return p.parse_args(argv)


def serve(args, loader) -> int:
    """Load the model, then serve the UI (shared with web_demo_hf.py)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from serving.webui import build_demo, launch
    from serving.worker import Worker

    worker = Worker(loader=loader, **worker_options(args)).start()
    print("Loading the model ...", flush=True)
    if not worker.wait_ready():
        print(f"error: could not load the model: {worker.error}", file=sys.stderr)
        return 1
    # the page and the chat are titled after the model loaded (visualglm-tiny is not VisualGLM-6B)
    launch(build_demo(worker, title=model_name_of(args.from_pretrained)), worker, host=args.host, port=args.port,
           share=args.share)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import model.sat  # noqa: F401  (sat compatibility fixes before anything imports sat)
    return serve(args, sat_engine_loader(args.from_pretrained, args.device, args.quant, args.tokenizer, args.backend,
                                         device_map=args.device_map))


if __name__ == "__main__":
    sys.exit(main())
