"""Shared fixtures: a tiny tokenizer trained on the spot and a tiny random VisualGLM checkpoint."""
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model.sat  # noqa: E402,F401  (applies the sat compatibility fixes before anything imports sat)
# sat's logger keeps the sys.stderr of the moment sat is first imported: import it now, not inside a test
# whose captured stream is closed afterwards (later tests then failed with "I/O operation on closed file")
import sat  # noqa: E402,F401
import model.fast.graphs  # noqa: E402
import model.fast.slots  # noqa: E402

CORPUS_ZH = ["这张图片的背景是什么颜色？", "图中有一个红色的圆形。", "描述这张图片。", "左上角有一个蓝色的三角形。",
             "图片里有几个形状？", "有两个形状。", "你好，请问你是谁？", "我是一个视觉语言模型。"]
CORPUS_EN = ["What colour is the background?", "There is a red circle in the image.", "Describe the image.",
             "How many shapes are there?", "There are two shapes.", "Hello, who are you?", "Is there a star?"]


def corpus():
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        zh, en = rng.choice(CORPUS_ZH), rng.choice(CORPUS_EN)
        lines += [f"<img></img>问：{zh}\n答：{rng.choice(CORPUS_ZH)}", f"<img></img>Q:{en}\nA:{rng.choice(CORPUS_EN)}",
                  f"{zh}\t{en}  {en}"]
    return lines


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from model.tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus(), out, vocab_size=600)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from model.tokenizer import ChatGLMTokenizer
    return ChatGLMTokenizer.from_pretrained(tokenizer_dir)


def make_tiny_config(tok, **kw):
    from model.configs import tiny_config
    return tiny_config(vocab_size=len(tok) + 8, bos_token_id=tok.bos_token_id, mask_token_id=tok.mask_token_id,
                       gmask_token_id=tok.gmask_token_id, pad_token_id=tok.pad_token_id, **kw)


def in_triton_interpreter(code: str) -> None:
    """Run `code` in a fresh Python with Triton's interpreter on (it must be chosen before Triton loads),
    from the tests folder; fail with its error output if it fails."""
    import subprocess
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, TRITON_INTERPRET="1",
                                   PYTHONPATH=os.pathsep.join(filter(None, [str(tests.parent), str(tests),
                                                                            os.environ.get("PYTHONPATH")]))))
    assert done.returncode == 0, done.stderr[-3000:]


def randomize(m, seed=0, std=0.2):
    """Random weights with enough spread that greedy decoding produces varied tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layernorm" in name or "ln_vision" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    return make_tiny_config(tokenizer)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory, tiny_config, tokenizer_dir):
    """A tiny random VisualGLM saved in sat format, with its tokenizer files inside."""
    from model.sat.checkpoint import build_model, save_checkpoint
    m = randomize(build_model(tiny_config, device="cpu"))
    out = tmp_path_factory.mktemp("ckpt") / "visualglm-test"
    save_checkpoint(m, out)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(tokenizer_dir / f, out / f)
    return out


@pytest.fixture(scope="session")
def tiny(ckpt_dir):
    """(model, tokenizer) loaded through the real loader."""
    from model.sat.loading import load_model_and_tokenizer
    return load_model_and_tokenizer(str(ckpt_dir), device="cpu")


@pytest.fixture(scope="session")
def image_file(tmp_path_factory):
    from PIL import Image, ImageDraw
    path = tmp_path_factory.mktemp("img") / "red_circle.png"
    img = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(img).ellipse([60, 60, 160, 160], fill="red")
    img.save(path)
    return path


def fail_rows(monkeypatch, which, at_step=None):
    """Make sampling fail for some rows of every generate() call, as NaN logits would: `which(rows)` gives
    the rows [B] bool (rows: model.sampling.RowSettings), at_step the decoding step (None: every step).
    Steps are counted per generate() call (each call builds its own RowSettings)."""
    from model import sampling
    real, steps = sampling.rank_logits, {}

    def flaky(logits, seen, rows):
        ranked = real(logits, seen, rows)
        step = steps[id(rows)] = steps.get(id(rows), -1) + 1
        if at_step is None or step == at_step:
            ranked.nan = ranked.nan | which(rows).to(ranked.nan.device)
        return ranked
    monkeypatch.setattr(sampling, "rank_logits", flaky)        # as generate()'s StepSampler calls it


def temperature_is(value):
    return lambda rows: (rows.plain - value).abs() < 1e-6


@pytest.fixture
def eps_plugin(monkeypatch):
    """Records any use of Pillow's EPS plugin: its header parser and its Ghostscript call."""
    from PIL import EpsImagePlugin
    calls = []

    def parse(self):
        calls.append("EpsImageFile._open")
        raise SyntaxError("the EPS plugin was reached")

    def ghostscript(*args, **kwargs):
        calls.append("Ghostscript")
        raise OSError("Ghostscript was called")
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", parse)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    return calls


def serve_until_ready(proc, url: str, log=lambda: "", seconds: float = 120) -> None:
    """Wait until a server process answers 200 at url; fail (with its log) if it exits or is too slow."""
    import httpx
    import time
    end = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log()
        assert time.monotonic() < end, "the server did not come up:\n" + log()
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)


def stop_process(proc) -> None:
    import subprocess
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def default_sigint() -> None:
    """Give a child process the default Ctrl-C. A test run started in the background (`nohup ... &`)
    ignores SIGINT, children inherit that, and Python then never raises KeyboardInterrupt: the tests of
    Ctrl-C would fail for a reason that is not the program's."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- CUDA graphs stood in for on the CPU ----------------------------------------------------------------
# the modules whose record / require_cuda fake_graphs replaces (graphs.try_record serves the others)
GRAPH_MODULES = (model.fast.slots, model.fast.graphs)


@pytest.fixture
def fake_graphs(monkeypatch):
    """CUDA graphs on the CPU: recording runs once and logs its pool, replay reruns over the static
    tensors and logs itself."""
    log = dict(pools=[], replays=[])

    class Replayed:
        def __init__(self, run, out):
            self.run, self.out = run, out

        def replay(self):
            log["replays"].append(self)
            self.out.copy_(self.run())

    def record(run, warmups=1, pool=None):
        log["pools"].append(pool)
        out = run()
        return Replayed(run, out), out
    for module in GRAPH_MODULES:
        monkeypatch.setattr(module, "record", record)
        monkeypatch.setattr(module, "require_cuda", lambda tensor: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)   # on a GPU machine these
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)                 # refuse the CPU device
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return log
