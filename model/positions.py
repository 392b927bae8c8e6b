"""2-D position ids and the GLM attention mask (spec 3.4 / 3.5), for a left-padded batch.

Row layout: [pad ... pad | context ... [gMASK] | <sop> gen_1 gen_2 ...]
    position_ids[i]       = i                inside the context,  = index of [gMASK] from <sop> on
    block_position_ids[i] = 0                inside the context,  = 1, 2, 3 ... from <sop> on
    mask[i, j] = 1  if j is in the context (bidirectional) or j <= i (causal), and neither is a pad.
Positions count from the first real token; pads get position 0 and are masked out.
"""
import torch


def glm_positions(context_length: int, length: int, mask_position: int = None, device=None) -> torch.Tensor:
    """Position ids [2, length] of one unpadded row whose <sop> sits at index `context_length`.
    mask_position defaults to context_length - 1 ([gMASK] right before <sop>)."""
    mask_position = context_length - 1 if mask_position is None else mask_position
    idx = torch.arange(length, device=device)
    position = torch.where(idx < context_length, idx, torch.full_like(idx, mask_position))
    block = torch.clamp(idx - context_length + 1, min=0)
    return torch.stack([position, block])


def glm_attention_mask(context_lengths, pad_lengths, total_length: int, device=None, dtype=torch.float32):
    """Float mask [B, 1, S, S], 1 = may attend (sat's convention). context_lengths exclude padding."""
    mask = torch.ones(len(context_lengths), total_length, total_length, device=device).tril_()
    for b, (c, pad) in enumerate(zip(context_lengths, pad_lengths)):
        mask[b, :, pad:pad + c] = 1           # the context is visible to everyone ...
        mask[b, :, :pad] = 0                  # ... the padding to no one
        mask[b, :pad, :] = 0
    return mask.unsqueeze(1).to(dtype)


def batch_inputs(sequences, pad_id: int, device=None, dtype=torch.float32, context_lengths=None):
    """Left-pad token sequences. context_lengths[b] = index of <sop> in row b (default: the last token,
    i.e. prompts that end with [gMASK] <sop>). Returns ids [B, S], position ids [B, 2, S],
    mask [B, 1, S, S] and the pad lengths."""
    total = max(len(s) for s in sequences)
    pads = [total - len(s) for s in sequences]
    ids = torch.tensor([[pad_id] * p + list(s) for p, s in zip(pads, sequences)], dtype=torch.long, device=device)
    contexts = context_lengths or [len(s) - 1 for s in sequences]  # everything before <sop>
    positions = torch.zeros(len(sequences), 2, total, dtype=torch.long, device=device)
    for b, (s, pad, c) in enumerate(zip(sequences, pads, contexts)):
        positions[b, :, pad:] = glm_positions(c, len(s), device=device)
    mask = glm_attention_mask(contexts, pads, total, device=device, dtype=dtype)
    return ids, positions, mask, pads


def next_positions(positions: torch.Tensor) -> torch.Tensor:
    """Position ids [B, 2, 1] of the token after the last one: same mask position, next block id."""
    last = positions[:, :, -1]                       # [B, 2]
    return torch.stack([last[:, 0], last[:, 1] + 1], dim=1)[:, :, None]


def inverse_frequencies(dim: int, device=None) -> torch.Tensor:
    """[dim / 2] rotary frequencies over `dim` channels, base 10000 (spec 3.3), shared by every flavour."""
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
