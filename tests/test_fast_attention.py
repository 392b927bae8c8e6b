"""The decoding attention kernel (model/fast/attention.py) against scaled_dot_product_attention: on a GPU
directly, on the CPU in Triton's interpreter (skipped where Triton is not installed, as in CI)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import in_triton_interpreter


def cases(device: str, dtype):
    """(q, keys, values, mask): one row and many, lengths that are no multiple of a block, keys that are a
    strided slice of a larger cache (as the slot pool hands them out), left pads and long masked tails."""
    torch.manual_seed(0)
    for B, heads, T, hd, length in ((1, 4, 100, 64, 37), (3, 2, 513, 32, 300), (5, 3, 64, 16, 1), (2, 2, 1000, 64, 999)):
        pool_k = torch.randn(B + 1, heads, T + 20, hd, device=device, dtype=dtype)
        pool_v = torch.randn(B + 1, heads, T + 20, hd, device=device, dtype=dtype)
        keys, values = pool_k[:B, :, :T], pool_v[:B, :, :T]                       # strided views
        q = torch.randn(B, heads, 1, hd, device=device, dtype=dtype)
        t = torch.arange(T, device=device)
        starts = torch.randint(0, max(1, length // 2), (B,), device=device)      # left pads per row
        mask = ((t[None] >= starts[:, None]) & (t[None] < length))[:, None, None]   # [B, 1, 1, T]
        yield q, keys, values, mask


def check_decode_attention(device: str) -> None:
    """With the chunking as shipped (one or two blocks per chunk at these sizes) and with one chunk per
    row and head (every block of a row in one program: the running max and sums carried across blocks)."""
    from model.fast import attention
    dtype = torch.float16 if device == "cuda" else torch.float32
    tol = 2e-3 if dtype == torch.float16 else 1e-4
    shipped = attention.PROGRAMS
    try:
        for programs in (shipped, 1):
            attention.PROGRAMS = programs
            for q, keys, values, mask in cases(device, dtype):
                want = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask)
                got = attention.decode_attention(q, keys, values, mask).float()
                assert got.shape == want.shape
                assert (got - want).abs().max() <= tol, (programs, q.shape, keys.shape, (got - want).abs().max())
    finally:
        attention.PROGRAMS = shipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the Triton kernel runs on the GPU only")
def test_decode_attention_equals_sdpa_on_the_gpu():
    pytest.importorskip("triton", reason="Triton is not installed on this CUDA machine")
    check_decode_attention("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernel itself (the test above)")
def test_decode_attention_equals_sdpa_in_the_interpreter():
    """The same check in Triton's interpreter on the CPU, in fp32 (a fresh process: the interpreter must be
    chosen before Triton loads)."""
    pytest.importorskip("triton", reason="Triton is not installed (CI has none): the interpreter check needs it")
    in_triton_interpreter("import test_fast_attention as t; t.check_decode_attention('cpu')")
