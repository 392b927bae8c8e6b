"""The VisualGLM-6B web demo (Gradio) on a Hugging Face model folder (model/hf, no sat, no remote code):
the same UI as web_demo.py, on port 8080 as upstream's web_demo_hf.py (web_demo.py: 7860).

    python web_demo_hf.py --from_pretrained visualglm-tiny-hf

visualglm-tiny-hf is the bundled tiny model converted by setup.sh (pretrained/visualglm-tiny-hf); any other
sat checkpoint converts with: python -m model.convert sat-to-hf SAT_DIR HF_DIR
"""
import argparse
import sys

from serving.cli import add_hf_model_args, add_worker_args, hf_engine_loader
from web_demo import serve


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_hf_model_args(p)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="8080, as upstream's web_demo_hf.py")
    p.add_argument("--share", action="store_true", help="also publish a temporary public link through Gradio")
    add_worker_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return serve(args, hf_engine_loader(args.from_pretrained, args.device, args.tokenizer))


if __name__ == "__main__":
    sys.exit(main())
