"""The commands of README.md run as written, after `bash setup.sh`, from a fresh checkout.

Each ```bash block of the README is listed in README_BLOCKS with how this test runs it: the whole block
as one bash script (so that a variable set on one line reaches the next) in a sandbox that looks like a
fresh clone (the repository's files linked into a temporary folder: runs, merged models and unzipped
data land there), on the CPU. Commands that need the 6B weights, a GPU, the network or installing
packages are left out with the reason. A few sizes are made small so that the suite stays quick, only
through what the commands themselves read: environment variables (TRAIN_ITERS) and the `replace` table
(`--generate 1000` becomes `--generate 3`). The list must match the README block for block. The
```python blocks run the same way, and every bash block of docs/*.md and recipes/README.md is checked
for commands that only work in an activated environment and for scripts or modules that do not exist.
"""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, serve_until_ready, stop_process

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "recipes" / "README.md"]

NEEDS_6B = "needs the visualglm-6b weights (16 GB, not in the repository)"
NEEDS_GPU_6B = "fine-tunes visualglm-6b: needs its weights and a 24 GB GPU"

# block (its commands, comments removed) -> how to run it
README_BLOCKS = {
    ("bash setup.sh", ".venv/bin/python cli_demo.py --from_pretrained visualglm-tiny"): dict(
        skip={"bash setup.sh": "installs the environment this test runs in"},
        stdin="examples/3.png\nWhere is the star?\n图中有几个图形？\nstop\n",
        expect=["VisualGLM：在", "VisualGLM: The star is", "VisualGLM：图中有"]),
    (".venv/bin/python -m pytest -q",): dict(skip={".venv/bin/python -m pytest -q": "this test suite itself"}),
    (".venv/bin/python cli_demo.py --from_pretrained visualglm-tiny --device cpu",
     ".venv/bin/python cli_demo.py --from_pretrained visualglm-6b --quant 4"): dict(
        skip={".venv/bin/python cli_demo.py --from_pretrained visualglm-6b --quant 4": NEEDS_6B},
        stdin="'examples/2.png'\n", expect=["VisualGLM：在粉色背景上"]),
    (".venv/bin/python -m zipfile -e fewshot-data.zip .", "bash finetune/finetune_visualglm.sh",
     "bash finetune/finetune_visualglm_qlora.sh", "ADAPTER=ptuning bash finetune/finetune_visualglm.sh"): dict(
        skip={"bash finetune/finetune_visualglm.sh": NEEDS_GPU_6B,
              "bash finetune/finetune_visualglm_qlora.sh": NEEDS_GPU_6B,
              "ADAPTER=ptuning bash finetune/finetune_visualglm.sh": NEEDS_GPU_6B},
        expect_files=["fewshot-data/dataset.json"]),
    (".venv/bin/python -m zipfile -e fewshot-data.zip .",
     "MODEL=visualglm-tiny bash finetune/finetune_visualglm.sh",
     "RUN=$(ls -d checkpoints/finetune-visualglm-tiny-* | tail -n 1)",
     '.venv/bin/python -m model.sat.merge_lora --from "$RUN" --to checkpoints/visualglm-tiny-background',
     ".venv/bin/python cli_demo.py --from_pretrained checkpoints/visualglm-tiny-background"): dict(
        env={"TRAIN_ITERS": "2"},       # the recipe's 300 iterations take a minute: the script's own knob
        stdin="examples/2.png\nstop\n",
        expect=["saved iteration 2 to checkpoints/finetune-visualglm-tiny-", "no validation set",
                "merged LoRA into", "VisualGLM："],
        expect_files=["checkpoints/visualglm-tiny-background/model_config.json"]),
    (".venv/bin/python api.py --from_pretrained visualglm-6b --quant 4",
     ".venv/bin/python web_demo.py --from_pretrained visualglm-tiny --device cpu"): dict(
        skip={".venv/bin/python api.py --from_pretrained visualglm-6b --quant 4": NEEDS_6B},
        server=True),
    (".venv/bin/python -m model.convert sat-to-hf visualglm-tiny checkpoints/visualglm-tiny-hf",
     ".venv/bin/python cli_demo_hf.py --from_pretrained checkpoints/visualglm-tiny-hf"): dict(
        stdin="examples/2.png\nstop\n", expect=["VisualGLM：在粉色背景上"],
        expect_files=["checkpoints/visualglm-tiny-hf/config.json"]),
    (".venv/bin/python cli_demo.py --from_pretrained visualglm-tiny --device-map vision=cpu,glm=cpu",
     ".venv/bin/python -m torch.distributed.run --nproc-per-node 1 cli_demo_mp.py --from_pretrained visualglm-tiny"): dict(
        stdin="examples/3.png\nWhere is the star?\nstop\n", expect=["VisualGLM: The star is"]),
    (".venv/bin/python cli_demo.py --from_pretrained visualglm-6b --device-map vision=cuda:0,glm=cuda:0+cuda:1",
     ".venv/bin/python -m torch.distributed.run --nproc-per-node 2 cli_demo_mp.py --from_pretrained visualglm-6b --quant 8",
     ".venv/bin/python -m model.sat.mp_split split visualglm-6b ./visualglm-6b-mp2 --mp 2"): dict(
        skip={".venv/bin/python cli_demo.py --from_pretrained visualglm-6b --device-map vision=cuda:0,glm=cuda:0+cuda:1":
              NEEDS_6B + " and two GPUs",
              ".venv/bin/python -m torch.distributed.run --nproc-per-node 2 cli_demo_mp.py --from_pretrained "
              "visualglm-6b --quant 8": NEEDS_6B + " and two GPUs",
              ".venv/bin/python -m model.sat.mp_split split visualglm-6b ./visualglm-6b-mp2 --mp 2": NEEDS_6B}),
    ('.venv/bin/python infer.py --from_pretrained visualglm-tiny --input examples --output out/answers.jsonl '
     '--prompt "Describe the image." --top_k 1',): dict(
        expect=["done 4, failed 0"], expect_files=["out/answers.jsonl"]),
    (".venv/bin/python evaluate.py --from_pretrained visualglm-tiny --generate 1000 --seed 2",
     ".venv/bin/python evaluate.py --from_pretrained visualglm-tiny --generate 1000 --seed 2 --wording rewordings"): dict(
        replace={"--generate 1000": "--generate 3"}, expect=["overall"]),
}

README_PYTHON = [
    # the original upstream snippet: on the bundled model, as the README says it runs
    dict(replace={'"visualglm-6b"': '"visualglm-tiny"', '"path/to/chatglm-6b"': '"pretrained/visualglm-tiny"'},
         check="assert len(history) == 2 and cache_image is not None"),
    # the second turn of each conversation is asked about the image of the first
    dict(check="assert len(history) == 2 and image is not None and history[0][0] == 'Where is the star?'"),
]


# -- reading the markdown ---------------------------------------------------------------------------------
def blocks(path: Path, language: str):
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.M | re.S)


def strip_comment(line: str) -> str:
    """`line` without a shell comment: a # at the start of a word, outside quotes and $( )."""
    quote, depth = None, 0
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith("$(", i):
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif ch == "#" and not depth and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands(block: str):
    """The commands of a bash block: continued lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for line in block.splitlines():
        line = strip_comment(line)
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line, pending = pending + line, ""
        if line.strip():
            out.append(" ".join(line.split()))
    return out


# -- the sandbox: a fresh clone after bash setup.sh ---------------------------------------------------------
OUTPUTS = {".git", "checkpoints", "fewshot-data", "work", "out", "__pycache__", ".pytest_cache"}


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A folder holding links to the repository's files, as a fresh clone would hold them, and a
    .venv/bin/python (the real one, or one that runs this interpreter where there is none)."""
    folder = tmp_path_factory.mktemp("clone")
    for entry in ROOT.iterdir():
        if entry.name not in OUTPUTS:
            (folder / entry.name).symlink_to(entry)
    if not (ROOT / ".venv" / "bin" / "python").exists():
        (folder / ".venv").unlink(missing_ok=True)
        bin_dir = folder / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
        (bin_dir / "python").chmod(0o755)
    return folder


def clean_env(**extra):
    """No activated environment (PATH without it, no VIRTUAL_ENV) and no GPU: as after `bash setup.sh`."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHON")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(CUDA_VISIBLE_DEVICES="", NUM_GPUS="0", GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1")
    env.update(extra)
    return env


def script_of(block: str, spec: dict) -> str:
    """The block as a bash script without its skipped commands, with the `replace` table applied."""
    kept, pending = [], []
    for line in block.splitlines():
        pending.append(line)
        if strip_comment(line).endswith("\\"):
            continue
        text = "\n".join(pending)
        pending = []
        (command,) = commands(text) or [None]
        if command is None or command in spec.get("skip", {}):
            continue
        for old, new in spec.get("replace", {}).items():
            text = text.replace(old, new)
        kept.append(text)
    return "set -euo pipefail\n" + "\n".join(kept) + "\n"


# -- the tests ---------------------------------------------------------------------------------------------
def test_the_list_matches_the_readme():
    found = {tuple(commands(b)) for b in blocks(ROOT / "README.md", "bash")}
    assert found == set(README_BLOCKS), ("README blocks not listed here:", found - set(README_BLOCKS),
                                         "listed here but not in the README:", set(README_BLOCKS) - found)
    for key, spec in README_BLOCKS.items():
        assert set(spec.get("skip", {})) <= set(key), key
        assert all(spec["skip"].values()) if "skip" in spec else True, "every skipped command needs a reason"
    assert len(blocks(ROOT / "README.md", "python")) == len(README_PYTHON)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for line in ("bash setup.sh", ".venv/bin/python cli_demo.py --from_pretrained visualglm-tiny",
                 ".venv/bin/python -m pytest -q"):
        assert re.search(rf"^{re.escape(line)}\b", readme, flags=re.M), line


RUNNABLE = [(key, spec) for key, spec in README_BLOCKS.items() if not set(key) <= set(spec.get("skip", {}))]


@pytest.mark.parametrize("key, spec", RUNNABLE,
                         ids=[[c for c in key if c not in spec.get("skip", {})][-1][:80] for key, spec in RUNNABLE])
def test_readme_block_runs_as_written(key, spec, clone):
    (block,) = [b for b in blocks(ROOT / "README.md", "bash") if tuple(commands(b)) == key][:1]
    script = script_of(block, spec)
    if spec.get("server"):
        return run_server(script, clone)
    done = subprocess.run(["bash", "-c", script], cwd=clone, input=spec.get("stdin", ""), capture_output=True,
                          text=True, timeout=600, env=clean_env(**spec.get("env", {})))
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{script}\n{output[-4000:]}"
    assert "Traceback" not in output and "Setting accelerator" not in output, output[-4000:]
    for text in spec.get("expect", []):
        assert text in output, f"{text!r} not in:\n{output[-4000:]}"
    for name in spec.get("expect_files", []):
        assert (clone / name).exists(), name


def run_server(script: str, clone: Path):
    """A server command: started with a free loopback port added, answered once, then stopped."""
    port = free_port()
    *setup, last = script.strip().splitlines()
    proc = subprocess.Popen(["bash", "-c", "\n".join(setup + [f"exec {last} --host 127.0.0.1 --port {port}"])],
                            cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
    try:
        serve_until_ready(proc, f"http://127.0.0.1:{port}/", log=proc.stdout.read)
    finally:
        stop_process(proc)
    output = proc.stdout.read()
    assert "Traceback" not in output and "Setting accelerator" not in output, output


@pytest.mark.parametrize("index", range(len(README_PYTHON)))
def test_readme_python_block_runs(index, clone):
    spec = README_PYTHON[index]
    code = blocks(ROOT / "README.md", "python")[index]
    for old, new in spec.get("replace", {}).items():
        assert old in code, old
        code = code.replace(old, new)
    done = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c", code + "\n" + spec["check"] + "\n"],
                          cwd=clone, capture_output=True, text=True, timeout=300, env=clean_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


ENTRY_POINTS = [["cli_demo.py"], ["evaluate.py"], ["api.py"], ["web_demo.py"], ["finetune_visualglm.py"],
                ["-m", "model.sat.merge_lora"], ["-m", "recipes.tiny_model"]]
HELP_PROBE = """
import runpy, sys
target = sys.argv[1:]
sys.argv = [target[-1], "--help"]
try:
    if target[0] == "-m":
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target[0], run_name="__main__")
except SystemExit as e:
    code = e.code
print("EXIT", code, "IMPORTED", sorted(m for m in ("sat", "deepspeed") if m in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("target", ENTRY_POINTS, ids=[t[-1] for t in ENTRY_POINTS])
def test_help_is_quiet_and_loads_neither_sat_nor_deepspeed(target):
    """--help prints the usage and nothing else, without importing sat and DeepSpeed (which took 4 of
    its 6 seconds) and so without DeepSpeed's accelerator warning."""
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, *target], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.startswith("usage:"), done.stdout + done.stderr
    assert done.stderr == "EXIT 0 IMPORTED []\n", done.stderr[-3000:]


# -- every documented command: no activated environment assumed, nothing that does not exist ---------------
BARE = {"python", "python3", "pip", "pip3", "pytest", "deepspeed"}


def documented_commands():
    for path in DOCS:
        for block in blocks(path, "bash"):
            for command in commands(block):
                yield path.relative_to(ROOT), command


def program_and_args(command: str):
    """The program a command line runs and its arguments, after VAR=value assignments."""
    words = command.split()
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    return (words[0], words[1:]) if words else (None, [])


def test_documented_commands_name_the_environment_and_exist():
    problems = []
    for where, command in documented_commands():
        program, args = program_and_args(command)
        if program is None or program in ("curl", "IMG=$(base64", "export", "cd"):
            continue
        if program in BARE:
            problems.append(f"{where}: `{command}` needs an activated environment: use .venv/bin/{program}")
        elif program.startswith(".venv/bin/"):
            if program not in (".venv/bin/python", ".venv/bin/pip", ".venv/bin/deepspeed"):
                problems.append(f"{where}: `{command}`: unexpected program {program}")
            elif program == ".venv/bin/python" and args[0] == "-m":
                if importlib.util.find_spec(args[1]) is None:
                    problems.append(f"{where}: `{command}`: no module {args[1]}")
            elif program in (".venv/bin/python", ".venv/bin/deepspeed") and args[0].endswith(".py") \
                    and not (ROOT / args[0]).is_file():
                problems.append(f"{where}: `{command}`: no file {args[0]}")
        elif program == "bash" and not (ROOT / args[0]).is_file():
            problems.append(f"{where}: `{command}`: no script {args[0]}")
    assert problems == []


@pytest.mark.parametrize("venv", [True, False])
def test_the_recipe_runs_the_environments_python_without_activation(tmp_path, venv):
    """recipes/train_visualglm_tiny.sh in a folder of its own, where `python` is a stub that prints how
    it was called: .venv/bin/python when setup.sh made one, python3 otherwise (no bare `python`, which a
    fresh machine may not have)."""
    import shutil
    repo = tmp_path / "repo"
    (repo / "recipes").mkdir(parents=True)
    shutil.copy(ROOT / "recipes" / "train_visualglm_tiny.sh", repo / "recipes")
    stubs = [repo / ".venv" / "bin" / "python"] if venv else []
    stubs.append(tmp_path / "path" / "python3")
    for stub in stubs:
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text('#!/bin/sh\necho "RAN $0 $*"\n')
        stub.chmod(0o755)
    (tmp_path / "out").mkdir()
    env = clean_env(PATH=f"{tmp_path / 'path'}:/usr/bin:/bin", WORK=str(tmp_path / "work"), OUT_DIR=str(tmp_path / "out"))
    done = subprocess.run(["bash", str(repo / "recipes" / "train_visualglm_tiny.sh")], capture_output=True,
                          text=True, timeout=60, env=env)
    ran = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("RAN ")]
    assert done.returncode == 0 and len(ran) == 10, done.stdout + done.stderr
    assert set(ran) == {".venv/bin/python" if venv else str(tmp_path / "path" / "python3")}
