"""Chat with VisualGLM in the terminal, on a Hugging Face model folder (model/hf: no sat, no remote code).
The same terminal chat as cli_demo.py (see its help for the keys and commands).

    python cli_demo_hf.py --from_pretrained visualglm-tiny-hf

visualglm-tiny-hf is the bundled tiny model converted by setup.sh (pretrained/visualglm-tiny-hf); any other
sat checkpoint converts with: python -m model.convert sat-to-hf SAT_DIR HF_DIR
"""
import sys

from cli_demo import TerminalChat, parse_args


def main(argv=None) -> int:
    args = parse_args(argv, hf=True, description=__doc__)
    from model.chat import ChatEngine
    from model.hf import HFBackend
    from model.hf.loading import HFLoadError, load_hf_model_and_tokenizer
    try:
        model, tokenizer = load_hf_model_and_tokenizer(args.from_pretrained, device=args.device, tokenizer=args.tokenizer)
    except HFLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
        return 130
    TerminalChat(ChatEngine(HFBackend(model), tokenizer), args, model.config.vocab_size).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
