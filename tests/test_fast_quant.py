"""Weight-only int8 / int4 layers of the fast path (model/fast/quant.py): CPU numerics within the bounds
the quantization error allows, and a quantized FastBackend still generating."""
import pytest
import torch
import torch.nn.functional as F

from model.fast import FastBackend
from model.fast.quant import (Int4Linear, Int8Linear, dequantize_int4_groups, group_size, pack_words,
                              quantize_int4_groups, unpack_words)
from model.generation import Request, generate
from model.quant import dequantize, quantize_weight
from model.sampling import SamplingParams
from model.sat.backend import SatBackend
from model.sat.checkpoint import build_model
from conftest import in_triton_interpreter, randomize


def test_int8_linear_error_is_within_half_a_step_per_weight():
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 256), torch.randn(96), torch.randn(5, 256)
    layer = Int8Linear(w, b)
    exact = x @ w.T + b
    step = w.abs().amax(1) / 127                                       # one quantization step per row
    bound = (x.abs() @ torch.ones(256, 1)) * step[None] / 2 + 1e-4     # sum_k |x_k| * step / 2
    assert ((layer(x) - exact).abs() <= bound).all()
    assert (layer(x) - exact).abs().max() > 0                          # it really is quantized


def test_int4_groups_round_trip_within_half_a_step_inside_their_range():
    torch.manual_seed(1)
    w = torch.randn(48, 256) * torch.linspace(0.1, 3, 256)            # groups of different ranges
    q, scales = quantize_int4_groups(w, group_size(256))
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scales.shape == (48, 2)
    back = dequantize_int4_groups(q, scales, torch.float32)
    step = scales.repeat_interleave(128, dim=1)                       # [48, 256]
    inside = (w >= -8.5 * step) & (w <= 7.5 * step)                   # not clipped by the chosen scale
    assert inside.float().mean() > 0.9
    assert ((back - w).abs()[inside] <= (step / 2 + 1e-6)[inside]).all()
    assert ((back - w).abs()[~inside] > (step / 2)[~inside]).all()     # clipped weights: the rest of the error


def test_int4_groups_take_the_scale_of_least_error():
    """No group does worse than with the full-range scale (largest weight at +7 or smallest at -8 steps),
    computed here on its own; heavy-tailed groups do better (the search clips their outliers)."""
    torch.manual_seed(7)
    w = torch.distributions.StudentT(3.0).sample((64, 512)) * 0.02
    q, scales = quantize_int4_groups(w, 128)
    groups = w.reshape(64, 4, 128)
    err = (dequantize_int4_groups(q, scales, torch.float32).reshape(64, 4, 128) - groups).square().sum(-1)
    full = torch.maximum(groups.amax(-1) / 7, -groups.amin(-1) / 8)
    err_full = ((groups / full[..., None]).round().clamp(-8, 7) * full[..., None] - groups).square().sum(-1)
    assert (err <= err_full * (1 + 1e-5)).all()
    assert err.sum() < 0.9 * err_full.sum()


@pytest.mark.parametrize("group", [128, 32])
def test_int4_words_hold_each_weight_where_the_kernel_reads_it(group):
    """Weight g*G + 2*(p*W + j) + e (W = G/8) is element e of pair p of word g*W + j, at bits
    (0, 16), (8, 24), (4, 20), (12, 28) for p = 0..3: checked weight by weight against the words' bytes."""
    torch.manual_seed(5)
    N, K, W = 3, 2 * group, group // 8
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    words = pack_words(q, group)
    assert words.dtype == torch.int32 and words.shape == (N, K // 8)
    raw = words.contiguous().view(torch.uint8).reshape(N, K // 8, 4)           # little-endian bytes
    for n in range(N):
        for k in range(K):
            g, r = divmod(k, group)
            p, j, e = r // (2 * W), (r // 2) % W, r % 2
            bit = ((0, 16), (8, 24), (4, 20), (12, 28))[p][e]
            byte = int(raw[n, g * W + j, bit // 8])
            assert (byte >> (bit % 8)) & 15 == int(q[n, k]), (n, k)
    assert torch.equal(unpack_words(words, group), q)


def test_int4_linear_matches_its_dequantized_weight_on_the_cpu():
    torch.manual_seed(2)
    w, x = torch.randn(64, 96), torch.randn(3, 96)
    layer = Int4Linear(w, None)
    assert layer.group == 32
    expected = x @ dequantize_int4_groups(*quantize_int4_groups(w, 32), torch.float32).T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    exact = x @ w.T                                                   # int4 of N(0, 1) weights: ~0.10
    assert 0.03 < (layer(x) - exact).norm() / exact.norm() < 0.15


def dequantized_copy(net, tiny_config, bits):
    """The float model with every GLM linear, the LM head and the word embedding replaced by the values
    its quantized layer holds: the independent computation a quantized fast backend must reproduce."""
    ref = build_model(tiny_config, device="cpu")
    ref.load_state_dict(net.state_dict())
    layers = [m for layer in ref.transformer.layers for m in (layer.attention.query_key_value, layer.attention.dense,
                                                              layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h)]
    with torch.no_grad():
        for m in layers + [ref.mixins["chatglm-final"].lm_head]:
            if bits == 8:
                q = Int8Linear(m.weight, None)
                m.weight.copy_(q.qweight.float() * q.scale[:, None])
            else:
                q = Int4Linear(m.weight, None)
                m.weight.copy_(dequantize_int4_groups(*quantize_int4_groups(m.weight, q.group), torch.float32))
        table = ref.transformer.word_embeddings.weight              # int8 per row under either --quant
        table.copy_(dequantize(*quantize_weight(table, 8), 8, torch.float32))
    return ref.eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_fast_backend_computes_its_dequantized_model(tiny_config, bits):
    from model.positions import batch_inputs
    net = randomize(build_model(tiny_config, device="cpu"), seed=4).eval()
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    ids = [20, 21, 22, 23, g, s]
    args = batch_inputs([ids], 3, dtype=torch.bool)[:3]
    with torch.no_grad():
        exact, _ = SatBackend(net).prefill(*args)
        expected, _ = SatBackend(dequantized_copy(net, tiny_config, bits)).prefill(*args)
    fast = FastBackend(net, quant=bits)
    logits, _ = fast.prefill(*args, capacity=32)
    assert torch.allclose(logits, expected, atol=1e-3, rtol=1e-3)
    assert (logits - exact).abs().max() > 1e-3                          # and it is not the float model
    assert net.transformer.layers[0].attention.query_key_value.weight.numel() == 0   # the float copy was freed
    params = SamplingParams(top_k=1, max_length=30)
    tokens = [st[0] for st in generate(fast, [Request(ids=ids, params=params)], 3, [])]
    assert len(tokens) == 30 - len(ids)


def gemv_tolerance(dtype, exact):
    """fp32 in the interpreter; on a GPU, the rounding of an fp16 / bf16 output (and tl.dot's inputs)."""
    return {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype] * max(exact.abs().max().item(), 1)


def epilogues(config, configs, bias):
    """(bias, GELU) pairs to check a tile with: neither, and on the first tile and the last (a one-row tile
    and a tl.dot one) the bias and bias + GELU. The epilogue is the same code under every tile, and each
    variant is one more compilation (the GPU run of this test is mostly Triton compiling)."""
    if config in (configs[0], configs[-1]):
        return (None, False), (bias, False), (bias, True)
    return ((None, False),)


def with_epilogue(exact, bias, gelu):
    """The exact product [M, N] fp32 with a GEMV's epilogue applied: + bias, then GELU (tanh)."""
    want = exact if bias is None else exact + bias.float()
    return F.gelu(want, approximate="tanh") if gelu else want


def long_rows(device: str) -> tuple:
    """On a GPU also one row of 16384 (the 7.8B model's down projection: a hundred steps of a tile's loop,
    N a multiple of every tile). Too slow for the interpreter."""
    return ((1, 64, 16384),) if device == "cuda" else ()


def check_every_gemv_tile(device: str) -> None:
    """The Triton GEMV under each of its tiles against x @ W.T (+ bias, + GELU in the epilogue), for int8
    weights (every value -128..127, with row scales) and for weights in x's dtype."""
    from model.fast import kernels
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(3)
    # edges not multiples of any tile; K = 301: int8 rows that cannot be read as 32-bit words
    for M, N, K in ((1, 40, 300), (3, 33, 1100), (17, 40, 200), (1, 24, 301)) + long_rows(device):
        x = torch.randn(M, K, device=device, dtype=dtype)
        bias = torch.randn(N, device=device, dtype=dtype)
        q = torch.randint(-128, 128, (N, K), device=device, dtype=torch.int8)
        q[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)            # both ends of the range
        scale = (torch.rand(N, device=device) * 0.02).to(dtype)
        float_w = (torch.randn(N, K, device=device) * 0.05).to(dtype)
        for w, s, exact in ((q, scale, x.float() @ (q.float() * scale.float()[:, None]).T),
                            (float_w, None, x.float() @ float_w.float().T)):             # exact [M, N]
            tol = gemv_tolerance(dtype, exact)
            for config in kernels.CONFIGS:
                for b, gelu in epilogues(config, kernels.CONFIGS, bias):
                    want = with_epilogue(exact, b, gelu)
                    got = kernels.gemv(x, w, s, b, config=config, gelu=gelu).float()
                    assert (got - want).abs().max() <= tol, (config, M, w.dtype, gelu, (got - want).abs().max())


def check_every_int4_tile(device: str) -> None:
    """The int4 GEMV (model/fast/kernels_int4.py) under each of its tiles against x @ W.T (+ bias), W the
    dequantized weight as torch unpacks it; every nibble value 0..15, groups of 128 and of 64."""
    from model.fast import kernels_int4
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(6)
    for M, N, K in ((1, 40, 256), (3, 33, 384), (20, 40, 512), (1, 24, 192)) + long_rows(device):
        group = group_size(K)
        x = torch.randn(M, K, device=device, dtype=dtype)
        bias = torch.randn(N, device=device, dtype=dtype)
        layer = Int4Linear(torch.randn(N, K, device=device, dtype=dtype) * 0.05, None)
        assert set(unpack_words(layer.qweight, group).unique().tolist()) == set(range(16))
        exact = x.float() @ layer.dequantized(torch.float32).T                        # [M, N]
        tol = gemv_tolerance(dtype, exact)
        for config in kernels_int4.CONFIGS:
            if config[0] > 1 and config[2] * group // 8 < 16:
                continue                                   # tl.dot takes 16 or more words per step
            for b, gelu in epilogues(config, kernels_int4.CONFIGS, bias):
                want = with_epilogue(exact, b, gelu)
                got = kernels_int4.gemv(x, layer.qweight, layer.scales, b, config=config, gelu=gelu).float()
                assert (got - want).abs().max() <= tol, (config, M, K, gelu, (got - want).abs().max())


def check_triton_kernels(device: str) -> None:
    check_every_gemv_tile(device)
    check_every_int4_tile(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the Triton GEMVs run on the GPU only")
def test_triton_gemvs_compute_the_dequantized_products_on_the_gpu():
    """The Triton GEMV (int8 and float weights) under every tile it may be tuned to."""
    pytest.importorskip("triton", reason="Triton is not installed on this CUDA machine")
    check_triton_kernels("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: tile timing runs on the GPU only")
def test_tile_timing_starts_after_the_work_queued_before_it():
    """kernels.graph_bench (the GEMVs' autotuning) times tiles on a stream of its own: it must wait for the
    current stream, or a tile writes its output block while earlier work still reads that block as a freed
    temporary (seen as a wrong product on an H200). The GPU is kept busy for ~1 s; the first timed call
    must find that work done."""
    pytest.importorskip("triton", reason="Triton is not installed on this CUDA machine")
    from model.fast import kernels
    counter = torch.zeros(1, device="cuda")
    kernels.graph_bench(lambda: counter.add_(1), quantiles=(0.5, 0.2, 0.8))    # imports and streams made
    torch.cuda.synchronize()
    torch.cuda._sleep(2 * 10 ** 9)                               # ~1 s of spinning at ~2 GHz
    busy_done = torch.cuda.Event()
    busy_done.record()
    seen = []

    def kernel_call():
        if not seen:
            seen.append(busy_done.query())
        counter.add_(1)

    kernels.graph_bench(kernel_call, quantiles=(0.5, 0.2, 0.8))
    assert seen == [True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves (the test above); the "
                                                  "interpreter takes minutes")
def test_triton_gemvs_compute_the_dequantized_products_in_the_interpreter():
    """The same check in Triton's interpreter on the CPU, in fp32 (a fresh process: the interpreter must be
    chosen before Triton loads)."""
    pytest.importorskip("triton", reason="Triton is not installed (CI has none): the interpreter check needs it")
    in_triton_interpreter("import test_fast_quant as t; t.check_triton_kernels('cpu')")
