"""Chat with VisualGLM in the terminal (sat checkpoints).

    python cli_demo.py --from_pretrained visualglm-tiny           # the bundled small model, offline
    python cli_demo.py --from_pretrained visualglm-6b            # the released weights in $SAT_HOME
    python cli_demo.py --from_pretrained ./checkpoints/my-finetune --quant 4

At the image prompt give a path (quoted or dragged in from a file manager is fine), a file:// or an
http(s) URL; Enter alone: text-only chat. Then type questions: each is answered in the prompt format of
its language (Chinese when it contains Chinese characters; --english: always English). `clear` starts
over with a new image, `stop` (or Ctrl-D, or Ctrl-C at a prompt) quits, Ctrl-C during an answer stops it.
"""
import argparse
import os
import shlex
import sys

from model.defaults import BACKEND_HELP, BACKENDS
from serving.cli import DEVICE_MAP_HELP, add_sampling_args

# "zh" / "en": the language of the last question (or --english); "both": before the first question
MESSAGES = {
    "zh": dict(image="请输入图像路径或URL（回车进入纯文本对话）：", user="用户：", bot="VisualGLM：",
               stopped="（已停止）",
               welcome="欢迎使用 VisualGLM 模型，输入图像URL或本地路径读图，继续输入内容对话，clear 重新开始，"
                       "stop 终止程序，Ctrl-C 中断回答"),
    "en": dict(image="Please enter the image path or URL (press Enter for plain text chat): ", user="User: ",
               bot="VisualGLM: ", stopped="(stopped)",
               welcome="Welcome to VisualGLM. Enter an image URL or local path to read an image, then chat; "
                       "'clear' starts over, 'stop' quits, Ctrl-C stops an answer."),
}
MESSAGES["both"] = dict(
    MESSAGES["zh"], image="请输入图像路径或URL（回车进入纯文本对话）/ Image path or URL (Enter: text only): ",
    user="用户 / User: ", welcome=MESSAGES["zh"]["welcome"] + "\n" + MESSAGES["en"]["welcome"])


def parse_args(argv=None, hf: bool = False, description: str = __doc__):
    """hf: the flags of cli_demo_hf.py (a Hugging Face folder; no --quant or --backend, which are sat's)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(p)
    p.add_argument("--english", action="store_true",
                   help="always the English prompt format and messages (default: each question's language)")
    if not hf:
        p.add_argument("--quant", choices=[8, 4], type=int, default=None, help="quantize the GLM weights to 8 or 4 bits")
    p.add_argument("--from_pretrained", type=str, default="THUDM/visualglm-6b" if hf else "visualglm-6b",
                   help="Hugging Face model folder" if hf else "checkpoint name or folder")
    p.add_argument("--tokenizer", type=str, default=None, help="folder with ice_text.model (default: found automatically)")
    p.add_argument("--prompt_zh", type=str, default="描述这张图片。", help="first question about a new image (Chinese)")
    p.add_argument("--prompt_en", type=str, default="Describe the image.", help="first question about a new image (English)")
    p.add_argument("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)")
    if not hf:
        p.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
        p.add_argument("--device-map", "--device_map", dest="device_map", default=None, help=DEVICE_MAP_HELP)
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    return p.parse_args(argv)


def image_argument(text: str) -> str:
    """What the user meant at the image prompt. Terminals paste a file dragged into them as 'path',
    "path" or path\\ with\\ escaped\\ spaces, so those are unquoted the way a shell would; a path that
    exists as typed (or a URL) is taken as typed. file:// URLs are read by model.image."""
    text = text.strip()
    if not text or "://" in text or os.path.exists(os.path.expanduser(text)):
        return text
    try:
        words = shlex.split(text)
    except ValueError:        # an unbalanced quote, e.g. an unquoted path with an apostrophe in it
        return text
    return words[0] if len(words) == 1 else text


class _Quit(Exception):
    """The user asked to leave: `stop`, Ctrl-D or Ctrl-C at a prompt."""


def ask(prompt: str) -> str:
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        print()               # end the prompt's line, so that the shell's prompt starts on a new one
        raise _Quit from None


def main(argv=None) -> int:
    args = parse_args(argv)
    from model.chat import ChatEngine
    from model.sat.checkpoint import CheckpointError
    from model.sat.device_map import backend_for
    from model.sat.loading import load_model_and_tokenizer

    try:
        model, tokenizer = load_model_and_tokenizer(args.from_pretrained, device=args.device, quant=args.quant,
                                                    tokenizer=args.tokenizer, device_map=args.device_map,
                                                    backend=args.backend)
        backend = backend_for(args.device_map, args.backend)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
        return 130
    TerminalChat(ChatEngine(model, tokenizer, backend=backend), args, model.config["vocab_size"]).run()
    return 0


class TerminalChat:
    ask = staticmethod(ask)       # how a prompt is read (cli_demo_mp.py shares rank 0's with the other ranks)

    def __init__(self, engine, args, vocab_size: int):
        import torch
        self.engine, self.args = engine, args
        self.lang = "en" if args.english else "both"
        self.generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
        self.vocab_size = vocab_size

    @property
    def msg(self) -> dict:
        return MESSAGES[self.lang]

    def run(self) -> None:
        """Conversations until the user quits."""
        try:
            self._conversations()
        except _Quit:
            pass
        except KeyboardInterrupt:   # one that landed outside a prompt or an answer: quit all the same
            print()

    def _conversations(self) -> None:
        from model.image import ImageLoadError
        print(self.msg["welcome"])
        while True:
            image_path = image_argument(self.ask(self.msg["image"]))
            if image_path == "stop":
                raise _Quit
            history, image = [], None
            if image_path:
                try:
                    image = self.engine.encode_image(image_path)
                except ImageLoadError as e:
                    print(f"error: {e}")
                    continue
                except KeyboardInterrupt:      # encoding a large image model on a CPU takes a while
                    print()
                    continue
                # the first question about an image: in the language of the conversation so far
                query = self.args.prompt_en if self.lang == "en" else self.args.prompt_zh
            else:
                query = self.ask(self.msg["user"])
            while query.strip() != "clear":
                if query.strip() == "stop":
                    raise _Quit
                if query.strip():
                    history, image = self.answer(query, history, image)
                query = self.ask(self.msg["user"])

    def answer(self, query: str, history, image):
        """Stream one answer; returns the new (history, image). Ctrl-C stops the answer where it is and
        keeps what was shown, as the web demo's Stop does."""
        from model.chat import PromptTooLongError
        from model.prompts import has_chinese
        english = self.args.english or not has_chinese(query)
        self.lang = "en" if english else "zh"
        a = self.args
        # the 6B vocabulary's Chinese-only pieces are kept out of English answers, as upstream does
        invalid = [slice(63823, 130000)] if english and self.vocab_size > 130000 else []
        shown, stream = "", None
        try:
            print(self.msg["bot"], end="", flush=True)
            stream = self.engine.stream_chat(None, query, history=history, image=image, english=english,
                                             generator=self.generator, max_length=a.max_length, top_p=a.top_p,
                                             top_k=a.top_k, temperature=a.temperature,
                                             repetition_penalty=a.repetition_penalty, invalid_slices=invalid)
            for response, new_history, image in stream:
                # process_response may rewrite punctuation already shown; print only the new tail
                if response.startswith(shown):
                    print(response[len(shown):], end="", flush=True)
                else:
                    print("\n" + self.msg["bot"] + response, end="", flush=True)
                shown = response
            print()
            return new_history, image
        except PromptTooLongError as e:
            print(f"\nerror: {e}")
            return history, image
        except KeyboardInterrupt:
            print(" " + self.msg["stopped"])
            return (history + [(query, shown)] if shown else history), image
        finally:
            if stream is not None:
                stream.close()    # stops the generation if the interrupt came between two tokens


if __name__ == "__main__":
    sys.exit(main())
