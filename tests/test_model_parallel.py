"""Model parallelism on the CPU: splitting and merging checkpoints (model/sat/mp_split.py), two gloo ranks
against one process (model/sat/parallel.py), and cli_demo_mp.py under torchrun against cli_demo.py.

The test model has 4 GLM, 2 EVA and 4 Q-Former heads and an even vocabulary: every part cuts in two.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.sat.checkpoint import checkpoint_file, load_model, read_config, read_state_dict
from model.sat.mp_split import main as mp_split_main
from model.sat.mp_split import shard, unshard

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node"]


def torchrun(nproc, *args, stdin=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*TORCHRUN, str(nproc), "--master-port", str(_port()), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def _port():
    from conftest import free_port
    return free_port()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, tokenizer, tokenizer_dir):
    """The tiny random test model with its vocabulary rounded up to a multiple of 4 rows."""
    import shutil

    from conftest import make_tiny_config, randomize

    from model.sat.checkpoint import build_model, save_checkpoint
    config = make_tiny_config(tokenizer)
    config["vocab_size"] += -config["vocab_size"] % 4
    out = tmp_path_factory.mktemp("mp") / "visualglm-even"
    save_checkpoint(randomize(build_model(config, device="cpu")), out)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(tokenizer_dir / f, out / f)
    return out


@pytest.fixture(scope="module")
def split2(ckpt_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "split2"
    assert mp_split_main(["split", str(ckpt_dir), str(out), "--mp", "2"]) == 0
    return out


# -- the cutting rule against sat's own (sat/mpu/layers.py partition) -----------------------------------------

def test_shard_cuts_like_sat_layers(ckpt_dir):   # (building the test model set up sat's groups, of size 1)
    from sat.mpu import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    torch.manual_seed(0)
    qkv = ColumnParallelLinear(8, 24, stride=3, bias=True)     # built for one rank: the full tensors
    row = RowParallelLinear(12, 8)
    emb = VocabParallelEmbedding(10, 4)
    for (weights, biases), w, b, dim, stride in [(qkv.partition(2), qkv.weight, qkv.bias, 0, 3),
                                                 (row.partition(2), row.weight, None, 1, 1),
                                                 (emb.partition(2), emb.weight, None, 0, 1)]:
        for rank in range(2):
            assert torch.equal(shard(w.data, dim, stride, rank, 2), weights[rank])
            if b is not None:
                assert torch.equal(shard(b.data, dim, stride, rank, 2), biases[rank])
        assert torch.equal(unshard(list(weights), dim, stride), w.data)


def test_split_then_merge_is_bit_exact_and_never_overwrites(ckpt_dir, split2, tmp_path):
    config = read_config(split2)
    assert config["model_parallel_size"] == 2 and config["eva_args"]["model_parallel_size"] == 2
    original = read_state_dict(checkpoint_file(ckpt_dir))
    halves = [read_state_dict(checkpoint_file(split2, rank)) for rank in range(2)]
    key = "transformer.layers.0.attention.query_key_value.weight"
    assert halves[0][key].shape[0] * 2 == original[key].shape[0]
    assert not torch.equal(halves[0][key], halves[1][key])
    merged = tmp_path / "merged"
    assert mp_split_main(["merge", str(split2), str(merged)]) == 0
    back = read_state_dict(checkpoint_file(merged))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)
    assert read_config(merged)["model_parallel_size"] == 1
    assert (merged / "ice_text.model").is_file()
    before = {p: p.stat().st_mtime_ns for p in merged.rglob("*")}
    assert mp_split_main(["split", str(ckpt_dir), str(merged), "--mp", "2"]) == 1    # exists: refused
    assert mp_split_main(["merge", str(split2), str(merged)]) == 1
    assert {p: p.stat().st_mtime_ns for p in merged.rglob("*")} == before
    assert mp_split_main(["merge", str(ckpt_dir), str(tmp_path / "x")]) == 1        # nothing to merge
    assert not (tmp_path / "x").exists()


def test_split_refuses_what_does_not_divide(ckpt_dir, tmp_path, capsys):
    assert mp_split_main(["split", str(ckpt_dir), str(tmp_path / "three"), "--mp", "3"]) == 1
    assert "cannot be cut into 3" in capsys.readouterr().err
    assert not (tmp_path / "three").exists()


# -- two gloo ranks against one process ------------------------------------------------------------------

def test_two_ranks_give_the_logits_and_answers_of_one_process(ckpt_dir, split2, image_file, tmp_path):
    """Both ways of loading: cut at load time from the single file, and each rank's file of a split folder."""
    from mp_worker import PROMPT, prompt_logits

    from model.chat import ChatEngine
    from model.sat.loading import tokenizer_for
    out = torchrun(2, ROOT / "tests" / "mp_worker.py", image_file, tmp_path / "ranks.pt", ckpt_dir, split2)
    assert out.returncode == 0, out.stderr[-3000:]
    results = torch.load(tmp_path / "ranks.pt", weights_only=False)     # [rank][source]

    one = load_model(str(ckpt_dir))
    engine = ChatEngine(one, tokenizer_for(one), backend="sat")
    embeds = engine.encode_image(image_file)[0]
    logits = prompt_logits(engine, embeds)
    greedy = engine.chat(None, PROMPT, image=embeds[None], english=True, top_k=1, max_length=120)[0]
    full_qkv = one.transformer.layers[0].attention.query_key_value.weight.shape[0]
    assert len(greedy) > 0
    for rank in results:
        *float_parts, int8 = rank
        for source in float_parts:
            assert source["qkv"][0] * 2 == full_qkv              # each rank really holds half the heads
            torch.testing.assert_close(source["logits"], logits, rtol=0, atol=1e-5)
            assert source["greedy"] == greedy
            assert source["sampled"] == results[0][0]["sampled"]  # same seed, same draws on every rank
        # --quant: each rank quantizes its own part (row-parallel layers get scales per half row, so the
        # int8 model is not bit-identical to one process's), and the ranks still agree with each other
        assert int8["layer"] == "QuantizedLinear" and int8["qkv"][0] * 2 == full_qkv
        assert (int8["logits"] - logits).abs().max() < 0.05 * logits.abs().max()
        assert int8["greedy"] == results[0][-1]["greedy"] and int8["sampled"] == results[0][-1]["sampled"]


def test_a_folder_split_for_two_needs_two_ranks(split2):
    from model.sat.checkpoint import CheckpointError
    from model.sat.parallel import load_model_parallel
    with pytest.raises(CheckpointError, match="split for 2 ranks, but 1 were started"):
        load_model_parallel(str(split2), "cpu")      # this process: sat's groups of size 1


def test_cli_demo_mp_answers_like_cli_demo(ckpt_dir, image_file):
    script = f"{image_file}\nWhat color is the circle?\nclear\n\nhello\nstop\n"
    flags = ["--from_pretrained", str(ckpt_dir), "--top_k", "1", "--max_length", "90"]
    one = subprocess.run([sys.executable, str(ROOT / "cli_demo.py"), *flags], input=script, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    two = torchrun(2, ROOT / "cli_demo_mp.py", *flags, stdin=script)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert one.stdout.count("VisualGLM：") + one.stdout.count("VisualGLM: ") == 3, one.stdout
    assert two.stdout == one.stdout


def test_cli_demo_mp_needs_a_launcher():
    out = subprocess.run([sys.executable, str(ROOT / "cli_demo_mp.py"), "--from_pretrained", "x"], input="",
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert out.returncode == 2 and "torchrun --nproc-per-node" in out.stderr
