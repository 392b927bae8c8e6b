"""One rank of tests/test_model_parallel.py, started by torchrun on the CPU (gloo).

    torchrun --nproc-per-node 2 tests/mp_worker.py IMAGE OUT.pt CHECKPOINT [CHECKPOINT ...]

Loads this rank's part of each CHECKPOINT (a single file, cut at load time, or a split folder), and of
the first one again quantized to int8, then records the logits of one image prompt, a greedy answer and
a sampled answer (seeded generator); rank 0 saves every rank's results ([rank][checkpoint..., int8]) to
OUT.pt for the test to compare with one process.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import model.sat  # noqa: E402,F401  (compatibility fixes first)
from model.chat import ChatEngine  # noqa: E402
from model.sat.loading import tokenizer_for  # noqa: E402
from model.sat.parallel import init_from_launcher, load_model_parallel  # noqa: E402

PROMPT = "What is in the picture?"


def prompt_logits(engine, image_embeds) -> torch.Tensor:
    """Next-token logits [V] of one image prompt through the chat core's own request building."""
    from model.positions import batch_inputs
    request = engine.make_request(PROMPT, [], image_embeds, english=True)
    ids, positions, mask, pads = batch_inputs([request.ids], engine.tokenizer.pad_token_id, dtype=torch.bool)
    logits, _ = engine.backend.prefill(ids, positions, mask, image_embeds[None].expand(1, -1, -1),
                                       torch.tensor([pads[0] + request.pre_image]))
    return logits[0]


def main(image, out, *checkpoints) -> None:
    init_from_launcher("cpu")
    mine = [run(ckpt, image) for ckpt in checkpoints] + [run(checkpoints[0], image, quant=8)]
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    if torch.distributed.get_rank() == 0:
        torch.save(everyone, out)
    torch.distributed.destroy_process_group()


def run(ckpt, image, quant=None) -> dict:
    part = load_model_parallel(ckpt, "cpu", quant=quant)
    engine = ChatEngine(part, tokenizer_for(part), backend="sat")
    embeds = engine.encode_image(image)[0]                                   # [L, hidden]
    greedy = engine.chat(None, PROMPT, image=embeds[None], english=True, top_k=1, max_length=120)[0]
    sampled = engine.chat(None, PROMPT, image=embeds[None], english=True, top_k=50, temperature=0.9,
                          max_length=120, generator=torch.Generator().manual_seed(7))[0]
    qkv = part.transformer.layers[0].attention.query_key_value
    return dict(logits=prompt_logits(engine, embeds), greedy=greedy, sampled=sampled, qkv=tuple(qkv.weight.shape),
                layer=type(qkv).__name__)


if __name__ == "__main__":
    main(*sys.argv[1:])
