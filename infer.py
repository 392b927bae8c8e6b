#!/usr/bin/env python
"""Answer many questions about many images, in batches, resumably (docs/batch-inference.md).

    python infer.py --from_pretrained visualglm-tiny --input examples/batch.jsonl --output out.jsonl --top_k 1
    python infer.py --from_pretrained visualglm-6b --input photos/ --prompt "描述这张图片。" --output out.jsonl
    python infer.py --ray auto --ray_workers 8 --device cuda ...      # on a Ray cluster, one model per GPU

--input: a JSON-lines file, one {"id", "text", "image", "history"?, "english"?} per line (image paths
relative to the file), or a folder of images (id = path in the folder, --prompt for all). --output: one
JSON line per input line (id, response, finish_reason, tokens, seconds, settings; or id and error),
appended as batches complete; rerunning skips the ids already there, so an interrupted run resumes.
"""
import argparse
import contextlib
import signal
import sys


def parse_args(argv=None):
    from model.defaults import DEMO_SAMPLING
    from offline.runner import BATCHING
    from serving.cli import add_model_args, add_sampling_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--input", required=True, help="a .jsonl file of questions, or a folder of images")
    io.add_argument("--output", required=True, help="the .jsonl file to append answers to (resumed if it exists)")
    io.add_argument("--prompt", default=None,
                    help="the question for a folder's images and for lines without 'text' "
                         "(default: 描述这张图片。, with --english: Describe the image.)")
    io.add_argument("--english", action="store_true",
                    help="always the English prompt format (default: each question's language, as the API does)")
    add_model_args(p)
    s = p.add_argument_group("sampling (as cli_demo.py; --top_k 1 is greedy and deterministic)")
    add_sampling_args(s, DEMO_SAMPLING)
    s.add_argument("--seed", type=int, default=None,
                   help="seed for sampling: each line gets its own generator, so its answer does not "
                        "depend on the batch, the order or the machine it ran on")
    b = p.add_argument_group("batching")
    b.add_argument("--batch_size", type=int, default=8, help="questions answered together in one forward pass")
    b.add_argument("--window_batches", type=int, default=4,
                   help="read this many batches ahead and group their prompts by length")
    b.add_argument("--workers", type=int, default=4, help="threads decoding images while the model runs")
    b.add_argument("--batching", choices=BATCHING, default="auto",
                   help="continuous: answers leave the batch as they end and the next lines take their place "
                        "(fast backend only); static: a batch runs to its longest answer; auto: continuous "
                        "when the backend can")
    b.add_argument("--gpu_memory_fraction", type=float, default=0.9,
                   help="share of the GPU's memory for the weights plus the key/value slots of continuous batching")
    r = p.add_argument_group("Ray cluster (pip install -r requirements_ray.txt)")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: --ray alone starts a local Ray instance; --ray auto joins the cluster "
                        "this machine belongs to; or ray://HEAD:10001")
    r.add_argument("--ray_workers", type=int, default=2, help="model actors (one model each)")
    r.add_argument("--ray_cpus", type=float, default=1.0, help="CPUs reserved per actor")
    r.add_argument("--ray_gpus", type=float, default=None, help="GPUs per actor (default: 1 with --device cuda, else 0)")
    args = p.parse_args(argv)
    for name in ("batch_size", "window_batches", "workers", "ray_workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from model.progress import bar
    from offline.inputs import InputError, read_inputs
    from offline.outputs import OutputFile
    from offline.runner import RunError, Summary, build_runner, pending

    def say(text):
        print(text, file=sys.stderr)

    source, target = Path(args.input).expanduser(), Path(args.output).expanduser()
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        say("error: --output is the input file; give another file (the output is appended to)")
        return 2
    if target.is_dir():
        say(f"error: --output {target} is a folder; give a .jsonl file")
        return 2
    options = dict(vars(args), model=args.from_pretrained)
    try:   # bad sampling values fail here, before the model loads
        from model.sampling import SamplingParams
        SamplingParams(**{k: options[k] for k in ("max_length", "top_p", "top_k", "temperature", "repetition_penalty")})
        output = OutputFile(target, say)
        done = output.done_ids()
        summary = Summary()
        total = sum(1 for _ in pending(read_inputs(source, args.prompt, args.english), done))
        records = pending(read_inputs(source, args.prompt, args.english), done, summary)
    except (InputError, ValueError, OSError) as e:
        say(f"error: {e}")
        return 2
    if total == 0:
        list(records)   # (counts what was skipped)
        print(summary.text())
        return 0

    progress = None

    def on_done(out):
        with _no_interrupt():          # a Ctrl-C between the two left written lines uncounted in the summary
            output.write(out)
            summary.add(out)
        progress.update(len(out))
    try:
        if args.ray is not None:
            from offline.ray_job import run_on_ray
            progress = bar(total=total, desc="Answering", unit="image")
            run_on_ray(args.ray, options, list(records), on_done, workers=args.ray_workers, cpus=args.ray_cpus,
                       gpus=args.ray_gpus)
        else:
            runner = build_runner(options)
            summary.restart()                 # the rate counts answering, not loading the model
            progress = bar(total=total, desc="Answering", unit="image")
            runner.process(records, on_done)
    except KeyboardInterrupt:
        _close(progress)
        say("interrupted: the answers written so far are kept; run the same command again to go on")
        print(summary.text())
        return 130
    except RunError as e:
        _close(progress)
        say(f"error: {e}")
        return 1
    finally:
        output.close()
    _close(progress)
    print(summary.text())
    return 0


@contextlib.contextmanager
def _no_interrupt():
    """SIGINT held back (delivered on leaving) where the OS lets a thread block it; elsewhere a no-op."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _close(progress) -> None:
    if progress is not None:
        progress.close()


if __name__ == "__main__":
    sys.exit(main())
