"""Chat with VisualGLM in the terminal (sat checkpoints).

    python cli_demo.py --from_pretrained visualglm-6b            # the released weights in $SAT_HOME
    python cli_demo.py --from_pretrained ./checkpoints/my-finetune --quant 4

At the image prompt give a path or an http(s) URL (Enter alone: text-only chat). Then type questions;
`clear` starts over with a new image, `stop` quits.
"""
import argparse
import sys

import torch

from model.defaults import DEMO_SAMPLING

MESSAGES = {
    False: dict(image="请输入图像路径或URL（回车进入纯文本对话）：", user="用户：", bot="VisualGLM：",
                welcome="欢迎使用 VisualGLM 模型，输入图像URL或本地路径读图，继续输入内容对话，clear 重新开始，stop 终止程序"),
    True: dict(image="Please enter the image path or URL (press Enter for plain text chat): ", user="User: ",
               bot="VisualGLM: ", welcome="Welcome to VisualGLM. Enter an image URL or local path to read an "
                                          "image, then chat; 'clear' starts over, 'stop' quits."),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEMO_SAMPLING
    p.add_argument("--max_length", type=int, default=d["max_length"], help="max length of prompt + answer, in tokens")
    p.add_argument("--top_p", type=float, default=d["top_p"], help="top p for nucleus sampling")
    p.add_argument("--top_k", type=int, default=d["top_k"], help="top k for top-k sampling (1 = greedy)")
    p.add_argument("--temperature", type=float, default=d["temperature"], help="temperature for sampling (0 = greedy)")
    p.add_argument("--repetition_penalty", type=float, default=d["repetition_penalty"])
    p.add_argument("--english", action="store_true", help="English prompts and answers")
    p.add_argument("--quant", choices=[8, 4], type=int, default=None, help="quantize the GLM weights to 8 or 4 bits")
    p.add_argument("--from_pretrained", type=str, default="visualglm-6b", help="checkpoint name or folder")
    p.add_argument("--tokenizer", type=str, default=None, help="folder with ice_text.model (default: found automatically)")
    p.add_argument("--prompt_zh", type=str, default="描述这张图片。", help="first question about a new image (Chinese)")
    p.add_argument("--prompt_en", type=str, default="Describe the image.", help="first question about a new image (English)")
    p.add_argument("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from model.chat import ChatEngine, PromptTooLongError
    from model.sat.checkpoint import CheckpointError
    from model.image import ImageLoadError
    from model.sat.loading import load_model_and_tokenizer

    try:
        model, tokenizer = load_model_and_tokenizer(args.from_pretrained, device=args.device, quant=args.quant,
                                                    tokenizer=args.tokenizer)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    engine = ChatEngine(model, tokenizer)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    sampling = dict(max_length=args.max_length, top_p=args.top_p, top_k=args.top_k,
                    temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                    invalid_slices=[slice(63823, 130000)] if args.english and model.config["vocab_size"] > 130000 else [])
    msg = MESSAGES[args.english]
    print(msg["welcome"])

    def ask(prompt):
        try:
            return input(prompt)
        except EOFError:
            return None

    while True:
        image_path = ask(msg["image"])
        if image_path is None or image_path.strip() == "stop":
            return 0
        image_path = image_path.strip()
        history, image = [], None
        if image_path:
            try:
                image = engine.encode_image(image_path)
            except ImageLoadError as e:
                print(f"error: {e}")
                continue
            query = args.prompt_en if args.english else args.prompt_zh
        else:
            query = ask(msg["user"])
            if query is None:
                return 0
        while True:
            if query.strip() == "stop":
                return 0
            if query.strip() == "clear":
                break
            if query.strip():
                print(msg["bot"], end="", flush=True)
                shown = ""
                try:
                    for response, history, image in engine.stream_chat(None, query, history=history, image=image,
                                                                       english=args.english, generator=generator,
                                                                       **sampling):
                        # process_response may rewrite punctuation already shown; print only the new tail
                        if response.startswith(shown):
                            print(response[len(shown):], end="", flush=True)
                        else:
                            print("\n" + msg["bot"] + response, end="", flush=True)
                        shown = response
                    print()
                except PromptTooLongError as e:
                    print(f"\nerror: {e}")
            query = ask(msg["user"])
            if query is None:
                return 0


if __name__ == "__main__":
    sys.exit(main())
