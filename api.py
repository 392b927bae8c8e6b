"""The VisualGLM-6B HTTP API (sat checkpoints): the original `POST /` contract plus OpenAI-compatible
chat completions with streaming, on port 8080 by default.

    python api.py --from_pretrained visualglm-6b                 # http://0.0.0.0:8080
    python api.py --from_pretrained ./checkpoints/my-finetune --quant 4 --port 8000

The server starts at once and loads the model in the background (GET /health: 503 until ready).
See docs/serving.md for the endpoints, examples, limits and flags.
"""
import argparse
import sys

from serving.cli import add_api_args, add_model_args, add_worker_args, run_api, sat_engine_loader


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_api_args(p)
    add_worker_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import model.sat  # noqa: F401  (sat compatibility fixes before anything imports sat)
    return run_api(args, sat_engine_loader(args.from_pretrained, args.device, args.quant, args.tokenizer, args.backend,
                                           device_map=args.device_map))


if __name__ == "__main__":
    sys.exit(main())
