"""Chat with VisualGLM split across several GPUs (sat model parallelism), in the terminal.

    torchrun --nproc-per-node 2 cli_demo_mp.py --from_pretrained visualglm-6b [the flags of cli_demo.py]
    torchrun --nproc-per-node 2 cli_demo_mp.py --from_pretrained ./visualglm-6b-mp2 --quant 4

Every rank holds 1/N of each layer (the GLM's and the vision encoder's: tensor parallel, see
model/sat/parallel.py) and runs the same chat; rank 0 reads the terminal and prints, and sends each line
it reads to the others. A single-file checkpoint is split at load time; a folder written by
`python -m model.sat.mp_split split ... --mp N` needs exactly N processes. --quant quantizes each rank's
part. Without GPUs the ranks run on the CPU over gloo. Ctrl-C stops every rank (torchrun passes it on).
"""
import os
import sys

import cli_demo


def main(argv=None) -> int:
    args = cli_demo.parse_args(argv, description=__doc__)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("error: start it with a launcher: torchrun --nproc-per-node N cli_demo_mp.py ...", file=sys.stderr)
        return 2
    if args.backend == "fast" or args.device_map:
        print("error: cli_demo_mp.py runs sat's model-parallel forward: no --backend fast or --device-map",
              file=sys.stderr)
        return 2
    from model.chat import ChatEngine
    from model.sat.checkpoint import CheckpointError
    from model.sat.loading import tokenizer_for
    from model.sat.parallel import broadcast, init_from_launcher, load_model_parallel

    device = init_from_launcher(args.device)
    import torch
    rank = torch.distributed.get_rank()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")      # one voice: rank 0's
    try:
        model = load_model_parallel(args.from_pretrained, device, quant=args.quant)
        tokenizer = tokenizer_for(model, args.tokenizer)
        error = None
    except CheckpointError as e:
        error = str(e)
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)    # every rank stops if one could not load
    if any(errors):
        if rank == 0:
            print(f"error: {next(e for e in errors if e)}", file=sys.stderr)
        return 1
    # every rank must draw the same tokens: one seed, rank 0's, for every rank's generator
    if args.seed is None:
        args.seed = broadcast(int(torch.randint(2 ** 31, ())) if rank == 0 else None)
    chat = LeadingChat if rank == 0 else FollowingChat
    chat(ChatEngine(model, tokenizer, backend="sat"), args, model.config["vocab_size"]).run()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


QUIT = None      # what rank 0 sends when the user leaves (Ctrl-D, Ctrl-C at a prompt)


def shared_ask(prompt: str) -> str:
    """Rank 0: read a line as cli_demo does, and send it (or the news that the user left) to the others."""
    from model.sat.parallel import broadcast
    try:
        line = cli_demo.ask(prompt)
    except cli_demo._Quit:
        broadcast(QUIT)
        raise
    return broadcast(line)


class LeadingChat(cli_demo.TerminalChat):
    """Rank 0: cli_demo's terminal chat, sharing every line it reads."""
    ask = staticmethod(shared_ask)


class FollowingChat(cli_demo.TerminalChat):
    """Ranks other than 0: the same conversation, with rank 0's lines instead of a keyboard."""

    @staticmethod
    def ask(prompt: str) -> str:
        from model.sat.parallel import broadcast
        line = broadcast(None)
        if line is QUIT:
            raise cli_demo._Quit
        return line


if __name__ == "__main__":
    sys.exit(main())
