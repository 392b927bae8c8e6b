"""2-D positions and the GLM mask, against the spec's worked example and sat's own (independent) code."""
import torch

from model.positions import batch_inputs, glm_positions, next_positions


def test_spec_example():
    # 7 text tokens + [gMASK] + <sop> + 3 generated: pos 0..7,7,7,7,7 ; block 0 x 8, 1, 2, 3, 4
    pos = glm_positions(context_length=8, length=12)
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7, 7]
    assert pos[1].tolist() == [0] * 8 + [1, 2, 3, 4]


def test_mask_is_bidirectional_over_context_and_causal_after():
    seq = [10, 11, 12, 13, 1, 2]  # 4 text, [gMASK]=1, <sop>=2
    ids, pos, mask, pads = batch_inputs([seq], pad_id=0)
    m = mask[0, 0]
    assert m[0, :5].tolist() == [1, 1, 1, 1, 1] and m[0, 5] == 0    # a context token sees all context
    assert m[5].tolist() == [1] * 6                                 # <sop> sees everything before it
    assert pads == [0]


def test_matches_sat_chatglm_for_left_padded_batch(tiny_config):
    from model.sat.checkpoint import build_model
    m = build_model(tiny_config, device="meta")
    gmask, sop, pad = tiny_config["gmask_token_id"], tiny_config["bos_token_id"], tiny_config["pad_token_id"]
    seqs = [[30, 31, 32, gmask, sop], [40, 41, 42, 43, 44, 45, gmask, sop]]
    ids, pos, mask, pads = batch_inputs(seqs, pad_id=pad)
    # sat computes both from the ids themselves (bos / gMASK lookup, leading pads)
    m.transformer.word_embeddings.weight = torch.nn.Parameter(torch.zeros(1))  # get_masks reads the dtype
    sat_mask = m.get_masks(ids, device="cpu")
    sat_pos = m.get_position_ids(ids, mask_positions=[s.tolist().index(gmask) for s in ids], device="cpu", gmask=True)
    assert torch.equal(pos, sat_pos)
    assert torch.equal(mask, sat_mask)


def test_next_positions_extend_block_ids():
    pos = glm_positions(context_length=5, length=7)[None]
    nxt = next_positions(pos)
    full = glm_positions(context_length=5, length=8)
    assert nxt[0, :, 0].tolist() == full[:, -1].tolist()
