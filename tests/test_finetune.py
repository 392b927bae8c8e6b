"""Fine-tuning end to end on the tiny random checkpoint (CPU, DeepSpeed over gloo), through the real entry
point of finetune_visualglm.py: LoRA / QLoRA / P-tuning runs and their checkpoints, the loss going
down, resuming, merge_lora, the adapter semantics of FineTuneVisualGLMModel and the shell scripts."""
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune_visualglm as ft
from model.image import normalize
from model.sat.checkpoint import CheckpointError, build_model, load_model
from model.configs import tiny_config as make_config
from model.sat.finetune import FineTuneVisualGLMModel, is_adapter_key
from test_finetune_data import make_dataset
from training.batches import collate
from training.data import VisualGLMDataset
from training.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

ADAPTERS = {
    "lora": (["--use_lora", "--layer_range", "1"], 5120),   # layer 1 only: qkv 3 x (10x64 + 64x10), dense 1 x
    "qlora": (["--use_qlora"], 2 * 5120),                   # all (both) layers
    "ptuning": (["--use_ptuning", "--pre_seq_len", "4"], 2 * 2 * 4 * 4 * 16),  # layers x (K,V) x heads x len x dim
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("fewshot"), 4)


def argv(ckpt_dir, data, save=None, *extra, iters=3):
    return ["--from_pretrained", str(ckpt_dir), "--train-data", str(data), "--train-iters", str(iters),
            "--batch-size", "2", "--lr", "1e-2", "--max_source_length", "64", "--max_target_length", "32",
            "--num-workers", "0", "--log-interval", "1", "--seed", "3",
            *(["--save", str(save)] if save else []), *extra]


@pytest.fixture(scope="module")
def runs(ckpt_dir, data, tmp_path_factory):
    """One short run per adapter kind, trained once for the tests below: name -> (TrainResult, stdout)."""
    cache = {}

    def get(name, capsys=None):
        if name not in cache:
            flags, _ = ADAPTERS[name]
            result = ft.run(argv(ckpt_dir, data, tmp_path_factory.mktemp(f"run-{name}"), *flags))
            cache[name] = (result, capsys.readouterr().out if capsys else "")
        return cache[name]
    return get


def probe_batch(tokenizer, data):
    ds = VisualGLMDataset([data], tokenizer, (224, 224), 32, 64, 32)
    batch = collate([ds[0], ds[1]], tokenizer.pad_token_id)
    batch["image"] = normalize(batch["image"])   # the loader's uint8 pixels, as forward_loss does
    return batch


@torch.no_grad()
def logits(model, batch):
    model.eval()
    return model(**{k: v for k, v in batch.items() if k != "labels"})[0].float()


def saved(run_dir: Path, iteration=None):
    iteration = iteration or (run_dir / "latest").read_text().strip()
    return torch.load(run_dir / str(iteration) / "mp_rank_00_model_states.pt", weights_only=True)


# ----------------------------------------------------------------------------------------------
# runs and their checkpoints

@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_run_writes_a_checkpoint_that_reloads_with_equal_logits(name, runs, ckpt_dir, data, tokenizer, capsys):
    result, out = runs(name, capsys)
    flags, trainable = ADAPTERS[name]
    if out:  # the first test to train this kind sees its log
        assert f"trainable parameters: {trainable:,} of " in out
        line = next(l for l in out.splitlines() if l.startswith("iteration"))
        for part in ("loss", "lr", "samples/s", "ETA"):
            assert part in line
    assert result.trainable == trainable and result.iteration == 3 and len(result.losses) == 3
    run_dir = result.run_dir
    assert run_dir.name.startswith("finetune-visualglm-")
    assert (run_dir / "latest").read_text().strip() == "3"
    for f in ("ice_text.model", "tokenizer_config.json", "train_log.jsonl", "3/deepspeed"):
        assert (run_dir / f).exists(), f
    config = json.loads((run_dir / "model_config.json").read_text())
    assert config["model_class"] == "FineTuneVisualGLMModel"
    assert config["use_lora"] == (name == "lora") and config["use_qlora"] == (name == "qlora")
    assert config["use_ptuning"] == (name == "ptuning") and "seed" not in config
    assert config["layer_range"] == ([1] if name == "lora" else None)
    state = saved(run_dir)                                   # weights-only torch.load
    assert list(state) == ["module"] and all(isinstance(v, torch.Tensor) for v in state["module"].values())

    # frozen weights are the base weights; the adapters moved
    base = saved(ckpt_dir)["module"]
    sd = state["module"]
    for key in ("mixins.eva.model.glm_proj.weight", "mixins.chatglm-final.lm_head.weight",
                "transformer.word_embeddings.weight"):
        assert torch.equal(sd[key], base[key]), key
    if name == "lora":
        assert torch.equal(sd["transformer.layers.1.attention.query_key_value.original.weight"],
                           base["transformer.layers.1.attention.query_key_value.weight"])
        assert "transformer.layers.0.attention.query_key_value.weight" in sd      # layer 0 untouched
        assert sd["transformer.layers.1.attention.dense.matrix_B.0"].abs().sum() > 0  # B started at zero
    adapters = [k for k in sd if is_adapter_key(k)]
    assert sum(sd[k].numel() for k in adapters) == trainable

    # the saved folder loads (class from model_config.json) and computes what the trained model computed
    batch = probe_batch(tokenizer, data)
    reloaded = load_model(str(run_dir))
    assert type(reloaded) is FineTuneVisualGLMModel
    assert torch.allclose(logits(reloaded, batch), logits(result.model, batch), atol=1e-5, rtol=0)
    if name == "qlora":
        nf4 = [m for m in result.model.transformer.modules() if type(m).__name__ == "NF4Linear"]
        assert len(nf4) == 2 * 4 and all(m.weight.dtype == torch.uint8 for m in nf4)  # every GLM linear is 4-bit
        assert torch.equal(logits(reloaded, batch), logits(result.model, batch))     # re-quantized bit for bit


def test_finetuned_folder_chats_in_cli_demo(runs, image_file, monkeypatch, capsys):
    import builtins

    import cli_demo
    result, _ = runs("lora")
    answers = iter([str(image_file), "stop"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    assert cli_demo.main(["--from_pretrained", str(result.run_dir), "--top_k", "1", "--max_length", "60"]) == 0
    assert "VisualGLM：" in capsys.readouterr().out


def test_loading_with_other_adapters_is_refused(runs):
    result, _ = runs("lora")
    with pytest.raises(CheckpointError, match="merge_lora"):
        load_model(str(result.run_dir), overwrite_config={"use_lora": False})


# ----------------------------------------------------------------------------------------------
# training actually trains

def fixed_batch_argv(ckpt_dir, tmp_path, *extra, lr="1e-2", iters=40):
    data = make_dataset(tmp_path / f"two-{lr}", 2)               # batch 2 of 2 samples: the same batch every step
    return argv(ckpt_dir, data, None, *extra, "--lr", lr, "--lr-decay-style", "constant", "--warmup", "0",
                "--log-interval", "10", iters=iters)


@pytest.mark.parametrize("mode", ["lora", "pretrain"])
def test_loss_goes_down_on_a_fixed_batch(mode, ckpt_dir, tokenizer_dir, tiny_config, tmp_path):
    extra = ["--use_lora", "--lora_rank", "8"] if mode == "lora" else []
    if mode == "pretrain":  # all weights, random init from a config: how the small bundled model is trained
        cfg = tmp_path / "model_config.json"
        cfg.write_text(json.dumps(tiny_config))
        extra = ["--mode", "pretrain", "--from_config", str(cfg), "--tokenizer", str(tokenizer_dir)]
    losses = ft.run(fixed_batch_argv(ckpt_dir, tmp_path, *extra, lr="5e-2" if mode == "lora" else "2e-3")).losses
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < 0.5 * start, losses

    # the same run with a zero learning rate does not learn: the assertion above can fail
    still = ft.run(fixed_batch_argv(ckpt_dir, tmp_path, *extra, lr="0", iters=8)).losses
    assert sum(still[-3:]) / 3 > 0.9 * sum(still[:3]) / 3, still


def test_pretrain_on_generated_data_mixed_with_a_file(ckpt_dir, data, tokenizer_dir, tiny_config, tmp_path, capsys):
    cfg = tmp_path / "model_config.json"
    cfg.write_text(json.dumps(tiny_config))
    args = argv(ckpt_dir, data, tmp_path / "runs", "--mode", "pretrain", "--from_config", str(cfg),
                "--tokenizer", str(tokenizer_dir), "--num-workers", "1", iters=3)
    args[args.index("--train-data") + 1:args.index("--train-data") + 2] = ["synthetic:8:2", str(data)]
    result = ft.run(args)
    out = capsys.readouterr().out
    assert "data: 12 training samples" in out            # 8 generated + the file's 4
    assert len(result.losses) == 3 and all(0 < x < 50 for x in result.losses)
    assert (result.run_dir / "3" / "mp_rank_00_model_states.pt").is_file()


# ----------------------------------------------------------------------------------------------
# resume

def test_resume_continues_exactly_where_a_run_stopped(ckpt_dir, data, tmp_path):
    common = ["--use_lora", "--zero-stage", "1", "--save-interval", "2", "--resume-dataloader"]
    whole = ft.run(argv(ckpt_dir, data, tmp_path / "whole", *common, iters=4))
    first = ft.run(argv(ckpt_dir, data, tmp_path / "parts", *common, "--exit-interval", "2", iters=4))
    assert first.iteration == 2 and (first.run_dir / "latest").read_text().strip() == "2"
    second = ft.run(argv(ckpt_dir, data, None, "--load", str(first.run_dir), *common, iters=4))
    assert second.run_dir == first.run_dir and second.iteration == 4
    # equal up to float noise, which Adam can amplify to ~1e-5 (CPU BLAS results may depend on memory
    # alignment); a resumed run that loses the dropout RNG state, the data position or the optimizer
    # state is off by ~1e-1 in the loss and ~1e-2 in the weights
    assert second.losses == pytest.approx(whole.losses[2:], abs=1e-3)
    a, b = saved(whole.run_dir, 4)["module"], saved(first.run_dir, 4)["module"]
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-3, worst


def test_two_processes_data_parallel_with_zero2(ckpt_dir, data, tmp_path):
    """Two ranks over gloo, started the way the deepspeed launcher starts one process per GPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "finetune_visualglm.py"),
           *argv(ckpt_dir, data, tmp_path / "runs", "--use_lora", "--zero-stage", "2", "--batch-size", "1", iters=2)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 iterations of 2 samples (1 x 1 accumulation x 2 processes)" in out.stdout
    assert out.stdout.count("trainable parameters") == 1            # rank 0 reports
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert {p.name for p in (run_dir / "2" / "deepspeed").iterdir()} >= {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert type(load_model(str(run_dir))) is FineTuneVisualGLMModel


# ----------------------------------------------------------------------------------------------
# merge_lora

@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_merge_lora_gives_a_plain_model_with_the_same_logits(name, runs, tokenizer, data, tmp_path, capsys):
    from model.sat.merge_lora import main as merge_main
    result, _ = runs(name)
    out = tmp_path / "merged"
    assert merge_main(["--from", str(result.run_dir), "--to", str(out)]) == 0
    merged = load_model(str(out))
    assert type(merged).__name__ == "VisualGLMModel"
    assert not any("matrix_" in k or ".original." in k for k in merged.state_dict())
    assert json.loads((out / "model_config.json").read_text())["model_class"] == "VisualGLMModel"
    assert (out / "ice_text.model").is_file()
    batch = probe_batch(tokenizer, data)
    before, after = logits(load_model(str(result.run_dir)), batch), logits(merged, batch)
    assert torch.allclose(before, after, atol=1e-4, rtol=0), (before - after).abs().max()
    # never overwrites; a run without LoRA has nothing to merge
    assert merge_main(["--from", str(result.run_dir), "--to", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    pt, _ = runs("ptuning")
    assert merge_main(["--from", str(pt.run_dir), "--to", str(tmp_path / "pt")]) == 1
    assert "no LoRA" in capsys.readouterr().err


def test_in_memory_merge_matches_and_lora_starts_equal_to_the_base(ckpt_dir, tokenizer, data):
    batch = probe_batch(tokenizer, data)
    base = logits(load_model(str(ckpt_dir)), batch)
    m = load_model(str(ckpt_dir), overwrite_config={"model_class": "FineTuneVisualGLMModel", "use_lora": True,
                                                    "lora_rank": 4}, allow_missing=is_adapter_key)
    assert torch.equal(logits(m, batch), base)                  # B starts at zero
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "matrix_B" in name:
                p.normal_(0, 0.05)
    tuned = logits(m, batch)
    assert not torch.allclose(tuned, base, atol=1e-3)
    assert torch.allclose(logits(m.merge_lora(), batch), tuned, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# adapter semantics (spec 8.2 / 8.3)

def test_layer_range_lists_layers_and_lora_scaling_is_one_over_rank():
    cfg = make_config(num_layers=3, model_class="FineTuneVisualGLMModel", use_lora=True, lora_rank=4,
                      layer_range=[0, 2])
    m = build_model(cfg, device="meta")
    keys = m.state_dict().keys()
    for layer, wrapped in ((0, True), (1, False), (2, True)):
        prefix = f"transformer.layers.{layer}.attention."
        assert (prefix + "query_key_value.original.weight" in keys) == wrapped
        assert (prefix + "query_key_value.weight" in keys) == (not wrapped)
    assert sorted(k.rsplit(".", 1)[1] for k in keys if "layers.0.attention.query_key_value.matrix_A" in k) == \
        ["0", "1", "2"]                                        # one LoRA pair each for Q, K and V
    assert [k for k in keys if "layers.0.attention.dense.matrix_" in k] == \
        ["transformer.layers.0.attention.dense.matrix_A.0", "transformer.layers.0.attention.dense.matrix_B.0"]
    assert not any("mlp" in k and "matrix" in k for k in keys)
    qkv = m.transformer.layers[0].attention.query_key_value
    assert qkv.scaling == pytest.approx(0.25) and tuple(qkv.matrix_B[0].shape) == (64, 4)
    with pytest.warns(UserWarning, match="layer"):   # the original default "0 14" on a small model
        small = build_model(dict(cfg, layer_range=[0, 14]), device="meta")
    assert any("layers.0.attention.query_key_value.original" in k for k in small.state_dict())
    for bad in ([14, 20], [0, 0], [-1]):
        with pytest.raises(ValueError, match="layer_range"):
            build_model(dict(cfg, layer_range=bad), device="meta")
    pt = build_model(dict(cfg, use_lora=False, use_ptuning=True, pre_seq_len=5), device="meta")
    assert tuple(pt.state_dict()["mixins.ptuning.prefix.2"].shape) == (2, 4, 5, 16)


def test_mode_and_flag_errors(ckpt_dir, data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs an adapter"):
        ft.run(argv(ckpt_dir, data))
    assert ft.main(argv(ckpt_dir, data)) == 1      # the command line reports it as `error: ...`
    assert "error: --mode finetune needs an adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--mode pretrain trains every weight"):
        ft.parse_args(argv(ckpt_dir, data, None, "--mode", "pretrain", "--use_lora"))
    with pytest.raises(SystemExit, match="zero-stage 3"):
        ft.parse_args(argv(ckpt_dir, data, None, "--use_lora", "--zero-stage", "3"))


def test_malformed_dataset_fails_before_the_model_loads(ckpt_dir, tmp_path, capsys):
    make_dataset(tmp_path, 1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"img": "img/0.png", "prompt": "q", "label": "a"},
                               {"img": "img/missing.png", "prompt": "q", "label": "a"}]))
    assert ft.main(argv(ckpt_dir, bad, None, "--use_lora")) == 1
    err = capsys.readouterr().err
    assert "bad.json[1]" in err and "missing.png" in err


# ----------------------------------------------------------------------------------------------
# the shell scripts

def test_qlora_script_runs_on_a_cpu_only_machine(ckpt_dir, data, tmp_path):
    for script in ("finetune_visualglm.sh", "finetune_visualglm_qlora.sh"):
        text = (ROOT / "finetune" / script).read_bytes()
        assert b"\r\n" not in text and b"set -euo pipefail" in text
    env = {**os.environ, "MODEL": str(ckpt_dir), "TRAIN_DATA": str(data), "SAVE": str(tmp_path / "runs"),
           "TRAIN_ITERS": "2", "LAYER_RANGE": "0 1", "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "",
           "NUM_GPUS": "0"}
    out = subprocess.run(["bash", str(ROOT / "finetune" / "finetune_visualglm_qlora.sh"), "--max_source_length", "64",
                          "--max_target_length", "32", "--num-workers", "0", "--log-interval", "1"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training on the CPU" in out.stderr
    assert "1 x 4 accumulation" in out.stdout            # QLoRA: micro-batch 1, 4 accumulation steps
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith(f"finetune-{ckpt_dir.name}-qlora-")    # named after the model it tunes
    assert (run_dir / "latest").read_text().strip() == "2"
    config = json.loads((run_dir / "model_config.json").read_text())
    assert config["use_qlora"] and config["lora_rank"] == 10 and config["layer_range"] == [0, 1]


def test_script_takes_recommended_defaults_from_the_model_folder(ckpt_dir, data, tmp_path):
    """finetune_defaults.env next to the weights replaces the 6B recipe's defaults, never the user's."""
    model = tmp_path / "model"
    shutil.copytree(ckpt_dir, model)
    (model / "finetune_defaults.env").write_text("# recommended\nTRAIN_ITERS=3\nLAYER_RANGE=0\nLR=2e-3\nBOGUS=1\n")
    env = {**os.environ, "MODEL": str(model), "TRAIN_DATA": str(data), "SAVE": str(tmp_path / "runs"),
           "LAYER_RANGE": "0 1", "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "NUM_GPUS": "0"}
    env.pop("TRAIN_ITERS", None)
    env.pop("LR", None)
    out = subprocess.run(["bash", str(ROOT / "finetune" / "finetune_visualglm.sh"), "--max_source_length", "64",
                          "--max_target_length", "32", "--num-workers", "0", "--log-interval", "1"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LR=2e-3 (from" in out.stderr and "ignoring unknown key 'BOGUS'" in out.stderr
    assert "--lr 2e-3" in out.stderr                       # the command line the script ran (set -x)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "latest").read_text().strip() == "3"
    assert json.loads((run_dir / "model_config.json").read_text())["layer_range"] == [0, 1]   # the user's value


def script_in_a_fake_repo(tmp_path, venv: bool):
    """finetune/*.sh copied into a folder of their own, where `python` is a stub that prints the
    command it was given: what the script chooses to run, without training."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "finetune", repo / "finetune")
    stub = "#!/bin/sh\necho \"RAN $0 $*\"\n"
    bins = [repo / ".venv" / "bin" / "python"] if venv else []
    bins.append(tmp_path / "path" / "python3")
    for path in bins:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(stub)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "EXPERIMENT", "VALID_DATA", "MODEL")}
    env.update(PATH=f"{tmp_path / 'path'}:{os.environ['PATH']}", NUM_GPUS="0")
    return repo, env


@pytest.mark.parametrize("venv", [True, False])
def test_scripts_use_the_repositorys_environment_and_name_runs_after_the_model(tmp_path, venv):
    repo, env = script_in_a_fake_repo(tmp_path, venv)
    python = str(repo / ".venv" / "bin" / "python") if venv else "python3"
    for script, model, experiment in [("finetune_visualglm.sh", "visualglm-tiny", "finetune-visualglm-tiny"),
                                      ("finetune_visualglm.sh", None, "finetune-visualglm-6b"),
                                      ("finetune_visualglm.sh", "./checkpoints/my-model/", "finetune-my-model"),
                                      ("finetune_visualglm_qlora.sh", "visualglm-tiny", "finetune-visualglm-tiny-qlora")]:
        done = subprocess.run(["bash", str(repo / "finetune" / script)], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path, env=dict(env, **({"MODEL": model} if model else {})))
        assert done.returncode == 0, done.stderr
        (ran,) = [line for line in done.stdout.splitlines() if line.startswith("RAN ")]
        words = ran.split()
        assert words[1].endswith(python) and words[2] == str(repo / "finetune_visualglm.py")
        assert words[words.index("--experiment-name") + 1] == experiment
        assert "--valid-data" not in words             # the training data is not passed off as validation data


def test_scripts_pass_a_validation_set_only_when_given(tmp_path):
    repo, env = script_in_a_fake_repo(tmp_path, venv=True)
    done = subprocess.run(["bash", str(repo / "finetune" / "finetune_visualglm.sh")], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env=dict(env, VALID_DATA="data/valid.json"))
    words = done.stdout.split()
    assert words[words.index("--valid-data") + 1] == "data/valid.json"


def test_the_log_says_when_there_is_no_real_validation_set(ckpt_dir, data, capsys):
    ft.run(argv(ckpt_dir, data, None, "--use_lora", iters=1))
    out = capsys.readouterr().out
    assert "no validation set: no validation loss will be reported" in out and "--split 9,1,0" in out
    ft.run(argv(ckpt_dir, data, None, "--use_lora", "--valid-data", str(data), iters=1))
    out = capsys.readouterr().out
    assert "warning: the validation data is training data" in out and "validation loss at the end" in out
    ft.run(argv(ckpt_dir, data, None, "--use_lora", "--split", "3,1", iters=1))
    out = capsys.readouterr().out
    assert "1 validation" in out and "validation data is training data" not in out and "no validation set" not in out
