"""cli_demo.py end to end in a subprocess: image turn, follow-up, clear, text-only, stop; missing weights."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args, stdin, env=None):
    return subprocess.run([sys.executable, str(ROOT / "cli_demo.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})


def test_chat_session(ckpt_dir, image_file, tmp_path):
    script = "\n".join([str(image_file), "背景是什么颜色？", "clear", "", "你好", "clear",
                        str(tmp_path / "missing.png"), "stop"]) + "\n"
    out = run_cli(["--from_pretrained", str(ckpt_dir), "--top_k", "1", "--max_length", "200"], script)
    assert out.returncode == 0, out.stderr
    # two answers for the image (automatic first prompt + follow-up), one text-only answer
    assert out.stdout.count("VisualGLM：") == 3, out.stdout
    assert "Image file not found" in out.stdout


def test_english_and_eof(ckpt_dir, image_file):
    out = run_cli(["--from_pretrained", str(ckpt_dir), "--english", "--top_k", "1", "--max_length", "120"],
                  f"{image_file}\n")  # ends with EOF after the automatic first answer
    assert out.returncode == 0, out.stderr
    assert "Welcome to VisualGLM" in out.stdout and out.stdout.count("VisualGLM: ") == 1


def test_missing_weights_say_where_it_looked(tmp_path):
    out = run_cli(["--from_pretrained", "visualglm-nowhere"], "", env={"SAT_HOME": str(tmp_path)})
    assert out.returncode == 1
    assert "Looked in" in out.stderr and str(tmp_path / "visualglm-nowhere") in out.stderr


# -- the chat loop without a model: a scripted engine and scripted keyboard ---------------------------------
import builtins  # noqa: E402
import io  # noqa: E402

import pytest  # noqa: E402

import cli_demo  # noqa: E402
from conftest import default_sigint  # noqa: E402


class ScriptedEngine:
    """Just enough of ChatEngine for TerminalChat: answers with `pieces`, raising KeyboardInterrupt
    before piece `interrupt_at` (as Ctrl-C inside generation would); records every question."""

    def __init__(self, pieces=("The circle", " is red."), interrupt_at=None):
        self.pieces, self.interrupt_at = pieces, interrupt_at
        self.calls, self.images, self.open_streams = [], [], 0

    def encode_image(self, source):
        self.images.append(source)
        return f"embeddings of {source}"

    def stream_chat(self, image_path, query, history=None, image=None, english=False, generator=None, **sampling):
        self.calls.append(dict(query=query, english=english, history=list(history), image=image,
                               invalid_slices=sampling["invalid_slices"]))
        self.open_streams += 1
        try:
            text = ""
            for i, piece in enumerate(self.pieces):
                if i == self.interrupt_at:
                    raise KeyboardInterrupt
                text += piece
                yield text, history, image
            yield text, history + [(query, text)], image
        finally:
            self.open_streams -= 1


def keyboard(monkeypatch, lines, engine=None):
    """input() that prints its prompt and returns `lines` one by one; an exception class in `lines` is
    raised instead (KeyboardInterrupt: Ctrl-C, EOFError: Ctrl-D). Returns the list of prompts shown and
    checks that no answer is still generating when the next prompt appears."""
    feed, prompts = iter(lines), []

    def fake_input(prompt=""):
        prompts.append(prompt)
        print(prompt, end="")
        if engine is not None:
            assert engine.open_streams == 0, "an interrupted answer was left generating"
        item = next(feed)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        print(item)
        return item
    monkeypatch.setattr(builtins, "input", fake_input)
    return prompts


def run_chat(monkeypatch, capsys, lines, engine=None, argv=(), vocab_size=1000):
    engine = engine or ScriptedEngine()
    prompts = keyboard(monkeypatch, lines, engine)
    cli_demo.TerminalChat(engine, cli_demo.parse_args(list(argv)), vocab_size).run()   # returns when the user quits
    return engine, prompts, capsys.readouterr().out


def test_each_question_gets_the_prompt_format_and_messages_of_its_language(monkeypatch, capsys):
    engine, prompts, out = run_chat(monkeypatch, capsys, ["examples/1.png", "What colour is the circle?",
                                                          "图中有几个图形？", "clear", "examples/2.png", "stop"],
                                    vocab_size=130528)
    assert [c["english"] for c in engine.calls] == [False, True, False, False]
    assert [c["query"] for c in engine.calls] == ["描述这张图片。", "What colour is the circle?", "图中有几个图形？",
                                                  "描述这张图片。"]
    # the 6B vocabulary's Chinese-only pieces are kept out of English answers only
    assert [bool(c["invalid_slices"]) for c in engine.calls] == [False, True, False, False]
    # before any question both languages; then the language of the last question
    assert "Welcome to VisualGLM" in out and "欢迎使用" in out
    assert prompts == [cli_demo.MESSAGES["both"]["image"], "用户：", "User: ", "用户：", "请输入图像路径或URL（回车进入纯文本对话）：",
                       "用户："]
    assert "VisualGLM: The circle is red." in out and "VisualGLM：The circle is red." in out


def test_a_new_image_is_described_in_the_language_of_the_last_question(monkeypatch, capsys):
    engine, prompts, out = run_chat(monkeypatch, capsys, ["", "Hello", "clear", "examples/2.png", "stop"])
    assert [(c["query"], c["english"]) for c in engine.calls] == [("Hello", True), ("Describe the image.", True)]
    assert prompts[1] == cli_demo.MESSAGES["both"]["user"] and prompts[2:] == [
        "User: ", "Please enter the image path or URL (press Enter for plain text chat): ", "User: "]


def test_english_flag_still_forces_english(monkeypatch, capsys):
    engine, prompts, out = run_chat(monkeypatch, capsys, ["examples/1.png", "图中有几个图形？", "stop"],
                                    argv=["--english"])
    assert [c["english"] for c in engine.calls] == [True, True]
    assert engine.calls[0]["query"] == "Describe the image."
    assert "欢迎" not in out and "VisualGLM：" not in out and set(prompts[1:]) == {"User: "}


def test_ctrl_c_during_an_answer_stops_it_and_the_chat_goes_on(monkeypatch, capsys):
    engine = ScriptedEngine(pieces=("The circle", " is", " red."), interrupt_at=2)
    engine, prompts, out = run_chat(monkeypatch, capsys, ["examples/1.png", "What colour is it?", "stop"],
                                    engine=engine)
    assert out.count("VisualGLM：The circle is （已停止）\n") == 1 and "VisualGLM: The circle is (stopped)\n" in out
    # what was shown stays in the conversation (as the web demo's Stop keeps it), with the image
    second = engine.calls[1]
    assert second["history"] == [("描述这张图片。", "The circle is")] and second["image"] == "embeddings of examples/1.png"
    assert prompts[-1] == "User: " and engine.open_streams == 0


def test_ctrl_c_between_two_tokens_closes_the_generation(monkeypatch, capsys):
    """The interrupt can land in the printing, outside the generator: the stream is closed anyway."""
    engine = ScriptedEngine(pieces=("a", "b", "c", "d"))
    keyboard(monkeypatch, ["", "Hello", "stop"], engine)
    real_stdout, writes = sys.stdout, []

    class Interrupting(io.StringIO):
        def write(self, text):
            writes.append(text)
            if text == "b":
                raise KeyboardInterrupt
            return real_stdout.write(text)
    monkeypatch.setattr(sys, "stdout", Interrupting())
    cli_demo.TerminalChat(engine, cli_demo.parse_args([]), 1000).run()
    assert engine.open_streams == 0 and "c" not in writes and " (stopped)" in writes


@pytest.mark.parametrize("key", [KeyboardInterrupt, EOFError])
@pytest.mark.parametrize("where", ["image prompt", "question prompt"])
def test_ctrl_c_or_ctrl_d_at_a_prompt_quits_cleanly_on_a_new_line(monkeypatch, capsys, key, where):
    lines = [key] if where == "image prompt" else ["examples/1.png", key]
    engine, prompts, out = run_chat(monkeypatch, capsys, lines)
    assert out.endswith(prompts[-1] + "\n")        # the shell's prompt starts on a line of its own


def test_ctrl_c_while_loading_exits_without_a_traceback(monkeypatch, capsys):
    import model.sat.loading as loading

    def slow_load(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(loading, "load_model_and_tokenizer", slow_load)
    assert cli_demo.main(["--from_pretrained", "visualglm-tiny"]) == 130
    assert capsys.readouterr().out == "\n"


@pytest.mark.parametrize("typed, meant", [
    ("'/tmp/my pictures/cat.png'", "/tmp/my pictures/cat.png"),          # GNOME Terminal's drag and drop
    ('"/tmp/my pictures/cat.png"', "/tmp/my pictures/cat.png"),
    ("/tmp/my\\ pictures/cat.png ", "/tmp/my pictures/cat.png"),         # macOS Terminal, trailing space
    ("  examples/1.png  ", "examples/1.png"),
    ("file:///tmp/my%20pictures/cat.png", "file:///tmp/my%20pictures/cat.png"),   # model.image reads these
    ("https://example.com/a b.png", "https://example.com/a b.png"),
    ("/tmp/it's.png", "/tmp/it's.png"),                                  # unbalanced quote: as typed
    ("", ""),
])
def test_image_prompt_accepts_quoted_and_escaped_paths(typed, meant):
    assert cli_demo.image_argument(typed) == meant


def test_a_path_that_exists_as_typed_is_not_unquoted(tmp_path):
    odd = tmp_path / "'quoted'.png"
    odd.write_bytes(b"")
    assert cli_demo.image_argument(str(odd)) == str(odd)


def test_dragged_in_paths_and_file_urls_open_the_image(tmp_path, image_file, ckpt_dir):
    import shutil
    from urllib.parse import quote
    folder = tmp_path / "my pictures"
    folder.mkdir()
    target = folder / "red circle.png"
    shutil.copy(image_file, target)
    typed = [f"'{target}'", str(target).replace(" ", "\\ "), "file://" + quote(str(target))]
    out = run_cli(["--from_pretrained", str(ckpt_dir), "--top_k", "1", "--max_length", "120"],
                  "".join(f"{t}\nclear\n" for t in typed) + "stop\n")
    assert out.returncode == 0, out.stderr
    assert "error" not in out.stdout and out.stdout.count("VisualGLM：") == 3, out.stdout


def test_ctrl_c_in_a_real_terminal(ckpt_dir, image_file):
    """In a pseudo-terminal, Ctrl-C (the terminal sends SIGINT) stops a long answer and returns to the
    prompt; a second Ctrl-C at the prompt ends the program with status 0 and no traceback."""
    import pty
    import select
    import time
    pid, fd = pty.fork()
    if pid == 0:   # the child: the chat, in the terminal
        default_sigint()
        os.chdir(ROOT)
        # a penalty below 1 makes the random model repeat a token to max_length instead of ending early:
        # on a slow machine the Ctrl-C must still find the answer running
        os.execv(sys.executable, [sys.executable, "cli_demo.py", "--from_pretrained", str(ckpt_dir),
                                  "--max_length", "2048", "--temperature", "1.5", "--top_k", "0", "--seed", "1",
                                  "--repetition_penalty", "0.01"])
    seen = b""

    def read_until(marker: bytes, timeout=120.0):
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < end, f"no {marker!r} in: {seen.decode(errors='replace')[-2000:]}"
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:        # the child closed the terminal
                    break
    try:
        read_until("(Enter: text only): ".encode())
        os.write(fd, f"{image_file}\n".encode())
        read_until("VisualGLM：".encode())
        os.write(fd, b"\x03")                                 # Ctrl-C during the answer
        read_until("（已停止）".encode())
        read_until("用户：".encode())
        time.sleep(0.5)                                       # a person sees the prompt, then presses Ctrl-C
        os.write(fd, b"\x03")                                 # Ctrl-C at the prompt
        status, end = None, time.monotonic() + 30             # never wait forever: a hang fails the test
        while status is None and time.monotonic() < end:
            done, code = os.waitpid(pid, os.WNOHANG)
            status = code if done else None
            if status is None and select.select([fd], [], [], 0.2)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    pass
        assert status is not None, "still running 30 s after Ctrl-C at the prompt:\n" + seen.decode(errors="replace")[-2000:]
        try:
            while select.select([fd], [], [], 0.2)[0]:
                seen += os.read(fd, 4096)
        except OSError:
            pass
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    text = seen.decode(errors="replace")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, text[-2000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-2000:]


def test_backend_flag_reaches_the_engine(monkeypatch, tiny):
    """--backend sat keeps the reference path (on a GPU the default would be the fast one)."""
    import sys
    import cli_demo
    chat_module = sys.modules["model.chat"]            # `model.chat` the attribute is the chat() function
    seen = {}

    class Recording(chat_module.ChatEngine):
        def __init__(self, *a, **kw):
            seen["backend"] = kw.get("backend")
            super().__init__(*a, **kw)
    monkeypatch.setattr(chat_module, "ChatEngine", Recording)
    monkeypatch.setattr("model.sat.loading.load_model_and_tokenizer", lambda *a, **kw: tiny)
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError()))
    assert cli_demo.main(["--from_pretrained", "x", "--backend", "sat"]) == 0
    assert seen["backend"] == "sat"
