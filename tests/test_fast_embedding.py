"""The fast path's word embedding (model/fast/embedding.py): shared as it is, or int8 under --quant."""
import pytest
import torch

from model.fast import FastBackend
from model.fast.embedding import Embedding, Int8Embedding
from model.sat.checkpoint import build_model
from conftest import randomize


def test_int8_rows_are_within_half_a_step_of_the_float_rows():
    torch.manual_seed(0)
    table = torch.randn(50, 64) * torch.linspace(0.1, 4, 50)[:, None]      # rows of different ranges
    ids = torch.tensor([[3, 49, 0], [7, 7, 20]])
    got, exact = Int8Embedding(table)(ids), Embedding(table)(ids)
    step = table.abs().amax(1) / 127                                       # one quantization step per row
    assert got.shape == (2, 3, 64) and got.dtype == table.dtype
    assert ((got - exact).abs() <= step[ids][..., None] / 2 + 1e-6).all()
    assert (got - exact).abs().max() > 0                                   # it really is quantized


def test_int8_keeps_the_tables_half_precision_dtype():
    table = torch.randn(10, 32).half()
    layer = Int8Embedding(table)
    assert layer.qweight.dtype == torch.int8 and layer(torch.tensor([1, 2])).dtype == torch.float16


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_backend_stores_the_embedding_as_int8_and_releases_the_float_table(tiny_config, bits):
    net = randomize(build_model(tiny_config, device="cpu"), seed=4).eval()
    table = net.transformer.word_embeddings.weight.detach().clone()
    fast = FastBackend(net, quant=bits)
    assert isinstance(fast.glm.word, Int8Embedding)
    assert net.transformer.word_embeddings.weight.numel() == 0            # the float table is gone
    assert fast.dtype == table.dtype and fast.glm.vocab_size == table.shape[0]
    ids = torch.arange(table.shape[0])
    assert torch.allclose(fast.glm.embed_tokens(ids[None])[0], table, atol=table.abs().max().item() / 200)
