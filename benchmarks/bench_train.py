#!/usr/bin/env python
"""Where training time goes: the data loader alone, the model step alone, and both together.

    python benchmarks/bench_train.py --from_pretrained visualglm-tiny --train-data <dataset.json ...> \
        --batch-sizes 64 256 --workers 15 [--bf16]

Uses the trainer's own pieces (training/: dataset, collate, DeepSpeed engine and config), so the
numbers are those of `finetune_visualglm.py --mode pretrain`. Prints samples/s for each part and the
ratio of the full pipeline to the faster of the two parts (1.0 = no part waits on the other).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from_pretrained", required=True)
    p.add_argument("--train-data", nargs="+", required=True)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args(argv)

    import model.sat  # noqa: F401  sat compatibility fixes
    import deepspeed
    from finetune_visualglm import parse_args
    from model.sat.loading import find_tokenizer_dir, load_tokenizer
    from training.batches import BatchOrder, make_loader
    from training.data import load_datasets
    from training.distributed import deepspeed_config, param_groups, setup_distributed, train_dtype
    from training.objective import forward_loss
    from training.source import load_for_training, resolve_source

    base = ["--mode", "pretrain", "--from_pretrained", a.from_pretrained, "--train-data", *a.train_data,
            "--max_source_length", "192", "--max_target_length", "64", "--lr", "1e-4", "--seed", "1"]
    base += ["--bf16"] if a.bf16 else []
    args = parse_args(base + ["--batch-size", str(a.batch_sizes[0])])
    dist = setup_distributed(args)
    source = resolve_source(args)
    tokenizer = load_tokenizer(find_tokenizer_dir(source.folder, source.config.get("tokenizer_type"), None))
    train_set, _, _ = load_datasets(args, tokenizer, source.config)
    model_, _ = load_for_training(args, source, dist, train_dtype(args, dist.device))
    for prm in model_.parameters():
        prm.requires_grad_(prm.is_floating_point())
    model_.train()
    sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)
    print(f"device {dist.device}; {len(train_set)} samples; workers {a.workers}")
    print(f"{'batch':>6} {'loader/s':>10} {'step/s':>10} {'both/s':>10} {'both/min(parts)':>16} {'ms/step':>8}")
    for bs in a.batch_sizes:
        args = parse_args(base + ["--batch-size", str(bs)])
        engine, *_ = deepspeed.initialize(model=model_, model_parameters=param_groups(model_),
                                          config=deepspeed_config(args, 1))
        order = BatchOrder(len(train_set), bs, 1, 0, seed=1)
        # loader alone (after its workers have started)
        loader = iter(make_loader(train_set, order, 0, a.steps + 5, tokenizer.pad_token_id, a.workers))
        for _ in range(5):
            batch = next(loader)
        t = time.time()
        for _ in range(a.steps):
            next(loader)
        loader_rate = a.steps * bs / (time.time() - t)
        # model step alone on one fixed batch
        for _ in range(3):
            engine.backward(forward_loss(engine, batch, dist.device))
            engine.step()
        sync()
        t = time.time()
        for _ in range(a.steps):
            loss = forward_loss(engine, batch, dist.device)
            engine.backward(loss)
            engine.step()
            loss.item()
        sync()
        step_time = (time.time() - t) / a.steps
        step_rate = bs / step_time
        # both, as the trainer runs them
        loader = iter(make_loader(train_set, order, 100, 100 + a.steps + 5, tokenizer.pad_token_id, a.workers))
        for _ in range(5):
            engine.backward(forward_loss(engine, next(loader), dist.device))
            engine.step()
        sync()
        t = time.time()
        for _ in range(a.steps):
            loss = forward_loss(engine, next(loader), dist.device)
            engine.backward(loss)
            engine.step()
            loss.item()
        sync()
        both = a.steps * bs / (time.time() - t)
        print(f"{bs:>6} {loader_rate:>10.0f} {step_rate:>10.0f} {both:>10.0f} "
              f"{both / min(loader_rate, step_rate):>16.2f} {1000 * step_time:>8.1f}")
    if dist.device.type == "cuda":
        print(f"max memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
