"""Model-parallel LoRA fine-tuning on the CPU (two gloo ranks): sat 0.4.12's LoRA bug on row-parallel layers
and its fix (model/sat/compat.py), finetune_visualglm.py --model-parallel-size 2 (one mp_rank_XX file per
rank), merging such a run (model/sat/merge_lora.py) and loading the result in one process.

The test model has 4 GLM, 2 EVA and 4 Q-Former heads and an even vocabulary, like tests/test_model_parallel.py's,
and no dropout, so that two ranks and one process train alike. Run as a script under torchrun, this file is
the worker of test_lora_across_two_ranks_equals_one_process.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
DENSE = "transformer.layers.0.attention.dense"


def prompt_batch(tokenizer, image_file):
    """One image question as the trainer's batches look (collate), with normalised pixels."""
    from model.image import normalize
    from training.batches import collate
    from training.data import VisualGLMDataset
    entries = [(Path(image_file), "probe", {"img": str(image_file), "prompt": "What is it?", "label": "A circle."})]
    ds = VisualGLMDataset(None, tokenizer, (224, 224), 32, 64, 32, entries=entries)
    batch = collate([ds[0]], tokenizer.pad_token_id)
    batch["image"] = normalize(batch["image"])
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch)[0].float()


# -- the worker (one rank, under torchrun) ----------------------------------------------------------------

def worker(lora_ckpt, tokenizer_dir, image_file, out) -> None:
    """This rank's part of a LoRA checkpoint (cut at load time): logits with the fixed LoraLinear.forward
    and with sat's own; rank 0 saves both."""
    from model.sat.compat import fix_sat_lora_row_parallel
    from model.sat.parallel import init_from_launcher, load_model_parallel
    from model.tokenizer import ChatGLMTokenizer
    from sat.model.finetune import lora2
    init_from_launcher("cpu")
    part = load_model_parallel(lora_ckpt, "cpu")
    batch = prompt_batch(ChatGLMTokenizer.from_pretrained(tokenizer_dir), image_file)
    assert fix_sat_lora_row_parallel() and lora2.LoraLinear.forward._visualglm_fixed
    fixed = logits(part, batch)
    lora2.LoraLinear.forward, patched = lora2.LoraLinear.forward._upstream, lora2.LoraLinear.forward
    upstream = logits(part, batch)
    lora2.LoraLinear.forward = patched
    if torch.distributed.get_rank() == 0:
        torch.save({"fixed": fixed, "upstream": upstream,
                    "dense_A": tuple(part.get_parameter(f"{DENSE}.matrix_A.0").shape)}, out)
    torch.distributed.destroy_process_group()


# -- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer, tokenizer_dir):
    """The tiny random model with every head count even, a vocabulary of a multiple of 4 and no dropout."""
    from conftest import make_tiny_config, randomize

    from model.sat.checkpoint import build_model, save_checkpoint
    config = make_tiny_config(tokenizer, **NO_DROPOUT)
    config["vocab_size"] += -config["vocab_size"] % 4
    for key in ("eva_args", "qformer_args"):
        config[key].update(NO_DROPOUT)
    out = tmp_path_factory.mktemp("mpft") / "visualglm-even"
    save_checkpoint(randomize(build_model(config, device="cpu")), out)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(tokenizer_dir / f, out / f)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_finetune_data import make_dataset
    return make_dataset(tmp_path_factory.mktemp("mpft-data"), 4)


def train_argv(base_dir, data, save, mp):
    return ["--from_pretrained", str(base_dir), "--train-data", str(data), "--train-iters", "2", "--batch-size", "2",
            "--lr", "1e-2", "--warmup", "0", "--max_source_length", "64", "--max_target_length", "32",
            "--num-workers", "0", "--log-interval", "1", "--seed", "3", "--use_lora", "--lora_rank", "4",
            "--save", str(save), "--model-parallel-size", str(mp)]


def only_run(folder: Path) -> Path:
    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    return run


# -- tests ------------------------------------------------------------------------------------------------

def test_lora_across_two_ranks_equals_one_process(base_dir, tokenizer, tokenizer_dir, image_file, tmp_path):
    """sat's LoRA on attention.dense needs its partial product all-reduced: without the fix two ranks give
    other logits than one process, with it the same (within 1e-5 in fp32)."""
    from test_model_parallel import torchrun

    from model.sat.checkpoint import load_model, save_checkpoint
    lora = load_model(str(base_dir), overwrite_config={"model_class": "FineTuneVisualGLMModel", "use_lora": True,
                                                       "lora_rank": 4, "layer_range": None},
                      allow_missing=lambda key: "matrix_" in key)
    with torch.no_grad():                 # B starts at zero (LoRA adds nothing): give every adapter a value
        g = torch.Generator().manual_seed(1)
        for name, p in lora.named_parameters():
            if "matrix_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora_dir = tmp_path / "lora"
    save_checkpoint(lora, lora_dir)
    one = logits(lora, prompt_batch(tokenizer, image_file))

    out = torchrun(2, __file__, lora_dir, tokenizer_dir, image_file, tmp_path / "ranks.pt")
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = torch.load(tmp_path / "ranks.pt")
    assert ranks["dense_A"][1] * 2 == lora.get_parameter(f"{DENSE}.matrix_A.0").shape[1]   # A really cut
    torch.testing.assert_close(ranks["fixed"], one, rtol=0, atol=1e-5)
    assert (ranks["upstream"] - one).abs().max() > 1e-2          # sat 0.4.12 as released: wrong


def test_two_rank_lora_finetune_merges_and_loads_in_one_process(base_dir, data, tokenizer, image_file, tmp_path):
    """finetune_visualglm.py with --model-parallel-size 2: two steps, a run with one file per rank, a third
    step resumed from it, merged by merge_lora into one file that loads in one process and gives the logits
    of the same training in one process (the same initial adapters, data and steps)."""
    from test_model_parallel import torchrun

    import finetune_visualglm as ft
    from model.sat.checkpoint import checkpoint_file, load_model, read_config, read_state_dict
    from model.sat.merge_lora import main as merge_main
    out = torchrun(2, ROOT / "finetune_visualglm.py", *train_argv(base_dir, data, tmp_path / "mp2", 2))
    assert out.returncode == 0, out.stderr[-3000:]
    run = only_run(tmp_path / "mp2")
    assert read_config(run)["model_parallel_size"] == 2 and read_config(run)["eva_args"]["model_parallel_size"] == 2
    halves = [read_state_dict(checkpoint_file(run, rank)) for rank in range(2)]
    assert halves[0][f"{DENSE}.matrix_A.0"].shape[1] == 32 and not torch.equal(
        halves[0][f"{DENSE}.matrix_A.0"], halves[1][f"{DENSE}.matrix_A.0"])
    torch.testing.assert_close(halves[0][f"{DENSE}.matrix_B.0"], halves[1][f"{DENSE}.matrix_B.0"],
                               rtol=0, atol=0)           # replicated on both ranks, and trained alike
    losses = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    single = ft.run(train_argv(base_dir, data, tmp_path / "mp1", 1))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single.losses), rtol=0, atol=1e-5)

    # --load resumes the run (each rank its part and its optimizer state) as one process resumes its own
    resume = ["--train-iters", "3", "--resume-dataloader"]
    out = torchrun(2, ROOT / "finetune_visualglm.py", *train_argv(base_dir, data, tmp_path / "mp2", 2), "--load",
                   run, *resume)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (run / "3").glob("mp_rank_*")) == ["mp_rank_00_model_states.pt",
                                                                      "mp_rank_01_model_states.pt"]
    single = ft.run(train_argv(base_dir, data, tmp_path / "mp1", 1) + ["--load", str(single.run_dir), *resume])
    third = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])
    assert third["iteration"] == 3 and abs(third["loss"] - single.losses[-1]) < 1e-5

    merged = tmp_path / "merged"
    assert merge_main(["--from", str(run), "--to", str(merged)]) == 0
    assert read_config(merged)["model_parallel_size"] == 1 and read_config(merged)["model_class"] == "VisualGLMModel"
    batch = prompt_batch(tokenizer, image_file)
    torch.testing.assert_close(logits(load_model(str(merged)), batch), logits(single.model, batch),
                               rtol=0, atol=1e-5)
    assert merge_main(["--from", str(run), "--to", str(merged)]) == 1      # never overwrites

    chat = subprocess.run([sys.executable, str(ROOT / "cli_demo.py"), "--from_pretrained", str(merged), "--top_k", "1",
                           "--max_length", "80"], input=f"{image_file}\nWhat is it?\nstop\n", capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert chat.returncode == 0 and "VisualGLM" in chat.stdout, chat.stderr[-3000:]


def test_model_parallel_flags_are_checked(base_dir, data, tmp_path, capsys):
    import finetune_visualglm as ft
    argv = train_argv(base_dir, data, tmp_path, 2)
    for extra in (["--use_ptuning"], ["--mode", "pretrain"]):
        with pytest.raises(SystemExit, match="--model-parallel-size > 1 is for LoRA"):
            ft.parse_args([a for a in argv if a != "--use_lora"] + extra)
    assert ft.main(argv) == 1          # one process cannot hold two model-parallel ranks
    assert "does not divide the 1 processes" in capsys.readouterr().err


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(*sys.argv[1:])     # (its first import, model.sat.compat, applies the sat fixes)
