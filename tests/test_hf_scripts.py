"""cli_demo_hf.py, api_hf.py and web_demo_hf.py as subprocesses, on the bundled model converted to the
Hugging Face format at test time, with sat made unimportable: they must answer as the sat front ends do."""
import base64
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import free_port, serve_until_ready, stop_process
from model.convert import sat_to_hf

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "pretrained" / "visualglm-tiny"
IMAGE = sorted((ROOT / "examples").glob("*.png"))[0]

# Runs a script with every import of sat refused (the HF flavour must not need it).
NO_SAT = r'''
import importlib.abc, runpy, sys

class NoSat(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "sat" or name.startswith("sat."):
            raise ImportError(f"sat is made unimportable for this test ({name})")

sys.meta_path.insert(0, NoSat())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''
ENV = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    return sat_to_hf(BUNDLED, tmp_path_factory.mktemp("hf") / "visualglm-tiny-hf")


def test_cli_demo_hf_answers_as_the_sat_model_does_without_sat(hf_tiny, tiny_bundled_answer):
    stdin = f"{IMAGE}\n描述这张图片。\nstop\n"
    done = subprocess.run([sys.executable, "-c", NO_SAT, "cli_demo_hf.py", "--from_pretrained", str(hf_tiny),
                           "--top_k", "1", "--device", "cpu"], input=stdin, cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [line for line in done.stdout.splitlines() if "VisualGLM：" in line]
    assert len(answers) == 2 and answers[0].endswith(f"VisualGLM：{tiny_bundled_answer}")   # the first: 描述这张图片。


def test_cli_demo_hf_says_how_to_convert_when_the_folder_is_not_hf(capsys):
    import cli_demo_hf
    assert cli_demo_hf.main(["--from_pretrained", str(BUNDLED), "--device", "cpu"]) == 1
    assert "python -m model.convert sat-to-hf" in capsys.readouterr().err


def test_api_hf_serves_the_converted_model_without_sat(hf_tiny, tmp_path, tiny_bundled_answer):
    port = free_port()
    log_path = tmp_path / "api.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", NO_SAT, "api_hf.py", "--from_pretrained", str(hf_tiny),
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        serve_until_ready(proc, f"http://127.0.0.1:{port}/health", log=log_path.read_text)
        body = {"text": "描述这张图片。", "image": base64.b64encode(IMAGE.read_bytes()).decode(), "top_k": 1}
        reply = httpx.post(f"http://127.0.0.1:{port}/", json=body, timeout=60, trust_env=False).json()
        assert reply["status"] == 200 and reply["response"] == tiny_bundled_answer
    finally:
        stop_process(proc)


def test_web_demo_hf_starts_on_the_converted_model_without_sat(hf_tiny, tmp_path):
    port = free_port()
    log_path = tmp_path / "web.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", NO_SAT, "web_demo_hf.py", "--from_pretrained", str(hf_tiny),
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        serve_until_ready(proc, f"http://127.0.0.1:{port}/", log=log_path.read_text)
        assert "visualglm-tiny-hf" in httpx.get(f"http://127.0.0.1:{port}/", timeout=10, trust_env=False).text
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def tiny_bundled_answer():
    """The sat model's greedy answer with the API's other defaults."""
    from model.chat import ChatEngine
    from model.defaults import DEMO_SAMPLING
    from model.sat.loading import load_model_and_tokenizer
    model, tok = load_model_and_tokenizer(str(BUNDLED), device="cpu")
    return ChatEngine(model, tok, backend="sat").chat(IMAGE.read_bytes(), "描述这张图片。", **dict(DEMO_SAMPLING, top_k=1))[0]


def test_visualglm_tiny_hf_names_the_bundled_model_converted_at_set_up(hf_tiny, tmp_path, monkeypatch, capsys):
    from model.hf import loading
    monkeypatch.setattr(loading, "BUNDLED_DIR", tmp_path)
    (tmp_path / "visualglm-tiny").symlink_to(BUNDLED)
    with pytest.raises(loading.HFLoadError, match="bash setup.sh .*python -m model.convert sat-to-hf visualglm-tiny"):
        loading.load_hf_model_and_tokenizer("visualglm-tiny-hf", device="cpu")          # before set-up: how to make it
    (tmp_path / "visualglm-tiny-hf").symlink_to(hf_tiny)
    model, tok = loading.load_hf_model_and_tokenizer("visualglm-tiny-hf", device="cpu")
    assert model.name_or_path == str(tmp_path / "visualglm-tiny-hf") and tok.gmask_token_id == model.config.gmask_token_id
