"""The VisualGLM-6B HTTP API on a Hugging Face model folder (model/hf, no sat, no remote code): the same
server as api.py (original `POST /` contract + OpenAI-compatible chat completions), port 8080.

    python api_hf.py --from_pretrained visualglm-tiny-hf --port 8080

See docs/serving.md for the endpoints, examples, limits and flags.

visualglm-tiny-hf is the bundled tiny model converted by setup.sh (pretrained/visualglm-tiny-hf); any other
sat checkpoint converts with: python -m model.convert sat-to-hf SAT_DIR HF_DIR
"""
import argparse
import sys

from serving.cli import add_api_args, add_hf_model_args, add_worker_args, hf_engine_loader, run_api


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_hf_model_args(p)
    add_api_args(p)
    add_worker_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_api(args, hf_engine_loader(args.from_pretrained, args.device, args.tokenizer))


if __name__ == "__main__":
    sys.exit(main())
