"""GLM position ids and attention mask built from token ids, for forward() calls that pass neither and for
transformers' generate() (which knows nothing of GLM's 2-D positions). Same layout as the chat core's
model/positions.py batch_inputs, but vectorised on the device (no host sync per decoding step):

    row:      [pad ... pad | context ... [gMASK] | <sop> answer ...]      (ChatGLM pads on the left)
    position: 0 on pads, i - pads inside the context, the [gMASK] index from <sop> on
    block:    0 up to <sop>, then 1, 2, 3 ...
    mask:     a query sees the whole context and the answer up to itself; pads see and are seen by nothing

The context ends at the first <sop> (bos); the mask position is the first [gMASK], else the first [MASK],
else the token before <sop>. Padding comes from a 2-D attention mask [B, T] (1 = token): only its
*leading* zeros count, because transformers also zeroes every pad id inside the prompt, and the image
placeholders of a VisualGLM prompt are pad ids (spec 5.4).
"""
from typing import Optional, Tuple

import torch


def leading_pads(attention_mask: Optional[torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """[B] count of left-padding tokens: the zeros before the first 1 of a 2-D mask (none without one)."""
    if attention_mask is None:
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    return (attention_mask.to(input_ids.device).long().cumsum(1) == 0).sum(1)


def glm_inputs(input_ids: torch.Tensor, config, attention_mask: Optional[torch.Tensor] = None,
               start: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] -> position ids [B, 2, T - start] and mask [B, 1, T - start, T] (bool, True = masked)
    of the queries from index `start` on (start = the cached length while decoding)."""
    B, T = input_ids.shape
    idx = torch.arange(T, device=input_ids.device)                               # [T]
    pads = leading_pads(attention_mask, input_ids)[:, None]                      # [B, 1]
    real = idx >= pads                                                           # [B, T]

    def first(hit, default):                      # index of the first hit after the pads, else default  [B]
        hit = hit & real
        return torch.where(hit.any(1), hit.int().argmax(1), default)

    context = first(input_ids == config.bos_token_id, torch.full_like(pads[:, 0], T))[:, None]          # [B, 1]
    gmask = input_ids == config.gmask_token_id
    mark = torch.where((gmask & real).any(1, keepdim=True), gmask, input_ids == config.mask_token_id)
    mark_at = first(mark, (context[:, 0] - 1).clamp(min=pads[:, 0]))[:, None]                         # [B, 1]
    position = torch.where(idx < context, idx - pads, mark_at - pads).clamp(min=0)                     # [B, T]
    block = (idx - context + 1).clamp(min=0)
    positions = torch.stack([position, block], 1)[:, :, start:]                                        # [B, 2, S]

    q = idx[start:, None]                                                                                # [S, 1]
    visible = (idx[None, None, :] < context[:, :, None]) | (idx <= q)[None]                            # [B, S, T]
    visible = visible & real[:, None, :] & real[:, start:, None]
    return positions, ~visible[:, None]


def image_starts(pre_image_length, pads: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
    """[B] index in input_ids of each row's first image slot: pre_image_length (int or [B], counted from
    the first token; negative = no image) moved right by the row's left padding."""
    starts = torch.as_tensor(pre_image_length, device=device).expand(batch)
    return starts if pads is None else torch.where(starts >= 0, starts + pads.to(device), starts)
