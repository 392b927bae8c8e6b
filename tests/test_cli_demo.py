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
