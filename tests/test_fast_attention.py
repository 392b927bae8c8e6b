"""The decoding step's attention kernel (model/fast/attention.py: rotary, cache write and attention in one)
against torch: the new q and k rotated as glm.py's unfused path does, written into a copy of the cache, and
scaled_dot_product_attention. On a GPU directly, on the CPU in Triton's interpreter (skipped where Triton
is not installed, as in CI)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import in_triton_interpreter
from model.fast.glm import rotary_pairs, rotary_table


def cases(device: str, dtype):
    """(qkv, cos, sin, perm, keys, values, mask, slots): one row and many, a shared slot and one per row,
    lengths that are no multiple of a block, a cache longer than the mask (a slot pool), left pads, NaN in
    every cache slot that no row may read (past its new token), and the new token in the first slot."""
    torch.manual_seed(0)
    for B, heads, T, hd, shared in ((1, 4, 100, 64, True), (3, 2, 513, 32, False), (5, 3, 64, 16, True),
                                    (2, 2, 1000, 64, False), (1, 2, 40, 16, True)):
        keys = torch.randn(B + 1, heads, T + 20, hd, device=device, dtype=dtype)     # a pool: rows and slots to spare
        values = torch.randn(B + 1, heads, T + 20, hd, device=device, dtype=dtype)
        if shared:
            slots = torch.randint(0, T, (1,), device=device).expand(B)
        else:
            slots = torch.randint(0, T, (B,), device=device)
        if T == 40:
            slots = torch.zeros(B, dtype=torch.long, device=device)                  # nothing cached yet
        t = torch.arange(T + 20, device=device)
        after = t[None, None, :, None] > slots[:, None, None, None]                  # [B, 1, T + 20, 1]
        keys[:B].masked_fill_(after, float("nan"))
        values[:B].masked_fill_(after, float("nan"))
        starts = (torch.rand(B, device=device) * slots.float() / 2).long()           # left pads per row
        mask = (t[None, :T] >= starts[:, None]) & (t[None, :T] <= slots[:, None])    # [B, T]
        qkv = torch.randn(B, 3 * heads * hd, device=device, dtype=dtype)
        cos, sin = rotary_table(2 * T, hd // 2, dtype, device)
        perm, sign = rotary_pairs(hd, device)
        where = torch.randint(0, 2 * T, (B, 2), device=device)                       # 2-D positions per row
        cos = torch.cat([cos[where[:, 0]], cos[where[:, 1]]], dim=-1)                # [B, hd]
        sin = torch.cat([sin[where[:, 0]], sin[where[:, 1]]], dim=-1) * sign.to(dtype)
        yield qkv, cos, sin, perm, keys, values, mask, slots


def reference(qkv, cos, sin, perm, keys, values, mask, slots):
    """The unfused step in torch: (attention [B, nh, 1, hd] fp32, keys, values with the new token written)."""
    B, (_, heads, _, hd) = qkv.shape[0], keys.shape
    qkv = qkv.view(B, 3, heads, hd)
    qk = (qkv[:, :2].float() * cos[:, None, None].float() +
          qkv[:, :2][..., perm].float() * sin[:, None, None].float()).to(qkv.dtype)  # fp32, rounded once
    keys, values = keys.clone(), values.clone()
    rows = torch.arange(B, device=qkv.device)
    keys[rows, :, slots] = qk[:, 1]
    values[rows, :, slots] = qkv[:, 2]
    T = mask.shape[1]
    got = F.scaled_dot_product_attention(qk[:, 0, :, None].float(), keys[:B, :, :T].float().nan_to_num(),
                                         values[:B, :, :T].float().nan_to_num(), attn_mask=mask[:, None, None])
    return got, keys, values


def check_decode_attention(device: str) -> None:
    """With the chunking as shipped (a few blocks per chunk at these sizes), with one chunk per row and
    head (the running max and sums carried across blocks), and with more chunks than blocks (empty ones)."""
    from model.fast import attention, kernels
    dtype = torch.float16 if device == "cuda" else torch.float32
    tol = 2e-3 if dtype == torch.float16 else 1e-4
    shipped = attention.PROGRAMS
    try:
        for programs in (shipped, 1, 4096):
            attention.PROGRAMS = programs
            for case in cases(device, dtype):
                want, want_keys, want_values = reference(*case)
                qkv, cos, sin, perm, keys, values, mask, slots = case
                got = attention.decode_attention(*case).float()
                assert got.shape == want.shape
                assert (got - want).abs().max() <= tol, (programs, keys.shape, (got - want).abs().max())
                written = torch.zeros(keys.shape, dtype=torch.bool, device=device)
                written[torch.arange(len(slots), device=device), :, slots] = True
                for cache, want_cache in ((keys, want_keys), (values, want_values)):
                    assert torch.equal(cache[~written].nan_to_num(), want_cache[~written].nan_to_num())
                    assert (cache[written].float() - want_cache[written].float()).abs().max() <= tol
                assert not kernels.counters(keys.device).any()                  # reset for the next call
    finally:
        attention.PROGRAMS = shipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the Triton kernel runs on the GPU only")
def test_decode_attention_equals_torch_on_the_gpu():
    pytest.importorskip("triton", reason="Triton is not installed on this CUDA machine")
    check_decode_attention("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernel itself (the test above)")
def test_decode_attention_equals_torch_in_the_interpreter():
    """The same check in Triton's interpreter on the CPU, in fp32 (a fresh process: the interpreter must be
    chosen before Triton loads)."""
    pytest.importorskip("triton", reason="Triton is not installed (CI has none): the interpreter check needs it")
    in_triton_interpreter("import test_fast_attention as t; t.check_decode_attention('cpu')")


def check_fast_path_with_the_kernel(compile: bool, device: str = "cpu") -> None:
    """The fast backend's batch-1 decoding with the kernel (on the CPU forced on, for tensors that only
    Triton's interpreter can run) against the same backend without it, in fp32: every step's logits, greedy
    tokens, and the cache it leaves; on a GPU, the greedy tokens against the sat backend too. compile: the
    step through torch.compile too, which must keep the kernel's writes into the cache (the op mutates its
    keys and values)."""
    from model.configs import tiny_config
    from model.fast import FastBackend, attention
    from model.generation import Request, generate
    from model.sampling import SamplingParams
    from model.sat.checkpoint import build_model
    from conftest import randomize
    cfg = tiny_config(num_layers=2, hidden_size=64, num_attention_heads=2)     # head_dim 32
    net = randomize(build_model(cfg, device="cpu"), seed=5).eval().to(device)
    g, s = cfg["gmask_token_id"], cfg["bos_token_id"]
    request = dict(ids=[20, 21, 22, 23, 24, g, s], params=SamplingParams(max_length=60, top_k=1))
    runs, shipped = [], attention.fits
    try:
        for fused in (False, True):
            attention.fits = lambda batch, positions, head_dim, on_gpu, fused=fused: fused and batch == positions == 1
            backend = FastBackend(net, compile=compile)
            seen = []
            real = backend.decode_step

            def spy(*args, real=real, seen=seen):
                logits, cache = real(*args)
                seen.append(logits.clone())
                return logits, cache
            backend.decode_step = spy
            tokens = [step[0] for step in generate(backend, [Request(**request)], 3, [])]
            runs.append((tokens, seen, [k.clone() for k in backend._cache.k], [v.clone() for v in backend._cache.v]))
    finally:
        attention.fits = shipped
    (tokens, logits, keys, values), (tokens_f, logits_f, keys_f, values_f) = runs
    assert tokens_f == tokens and len(tokens) == 60 - 7
    if device == "cuda":                 # the GPU's GEMVs (GELU in their epilogue) too, against sat's model
        from model.sat.backend import SatBackend
        assert [step[0] for step in generate(SatBackend(net), [Request(**request)], 3, [])] == tokens
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(logits, logits_f))
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(keys + values, keys_f + values_f))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the Triton kernel runs on the GPU only")
def test_fast_path_with_the_kernel_equals_it_without_on_the_gpu():
    pytest.importorskip("triton", reason="Triton is not installed on this CUDA machine")
    check_fast_path_with_the_kernel(True, "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernel itself (the test above)")
def test_fast_path_with_the_kernel_equals_it_without_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (CI has none): the interpreter check needs it")
    in_triton_interpreter("import test_fast_attention as t; t.check_fast_path_with_the_kernel(False); "
                          "t.check_fast_path_with_the_kernel(True)")
