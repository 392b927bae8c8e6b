"""Tests for model/sat/quantization.py (weight-only int8/int4, pure torch, CPU)."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model.sat  # noqa: F401  (sat import guard first)
from model.sat import quantization as Q
from model.sat.quantization import (QuantizedLinear, dequantize, dequantize_weight, pack_int4, quantize,
                                quantize_weight, unpack_int4)
from sat.model.official.chatglm_model import ChatGLMModel
from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear

GLM_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
NUM_LAYERS = 2
BOS, MASK, GMASK, PAD = 5, 3, 4, 0


# ----------------------------------------------------------------------------------------------------
# tiny sat ChatGLM model + input
# ----------------------------------------------------------------------------------------------------
def _args():
    return ChatGLMModel.get_args(
        num_layers=NUM_LAYERS, hidden_size=64, num_attention_heads=4, vocab_size=1000,
        max_sequence_length=64, layernorm_order="post", bos_token_id=BOS, mask_token_id=MASK,
        gmask_token_id=GMASK, pad_token_id=PAD, inner_hidden_size=256, skip_init=False,
    )


def _build(state_dict=None):
    # Every sat BaseModel construction reseeds the global RNGs; tests use their own generators.
    m = ChatGLMModel(_args())
    if state_dict is not None:
        m.load_state_dict(state_dict)
    return m.eval()


@pytest.fixture(scope="module")
def float_state():
    """Float weights of the reference model; biases and LayerNorms are perturbed away from sat's
    zero/one init so that bias handling is exercised."""
    m = _build()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "layernorm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def batch():
    """[B=2, S=12] ChatGLM-style input: context tokens, [gMASK], <sop>, 2 generated tokens; 2-D positions
    [B, 2, S] (§3.4) and a [B, 1, S, S] mask of ones = keep (context fully visible, causal after)."""
    g = torch.Generator().manual_seed(7)
    B, S, ctx = 2, 12, 10
    ids = torch.randint(6, 1000, (B, S), generator=g)
    ids[:, ctx - 2] = GMASK
    ids[:, ctx - 1] = BOS
    pos = torch.cat([torch.arange(ctx), torch.full((S - ctx,), ctx - 2)])
    block = torch.cat([torch.zeros(ctx, dtype=torch.long), torch.arange(1, S - ctx + 1)])
    position_ids = torch.stack([pos, block]).unsqueeze(0).expand(B, 2, S).contiguous()
    mask = torch.ones(B, 1, S, S).tril()
    mask[..., :ctx] = 1
    return ids, position_ids, mask


def _logits(m, batch):
    ids, position_ids, mask = batch
    extra = {}
    if "eva" in getattr(m, "mixins", {}):  # the project's VisualGLMModel needs the image kwargs
        extra = {"image": None, "pre_image": 0}
    with torch.no_grad():
        out = m(ids, position_ids=position_ids, attention_mask=mask.to(m.transformer.word_embeddings.weight.dtype),
                **extra)
    return out[0] if isinstance(out, (list, tuple)) else out


def _glm_paths():
    return [f"transformer.layers.{i}.{n}" for i in range(NUM_LAYERS) for n in GLM_LINEARS]


# ----------------------------------------------------------------------------------------------------
# int4 packing
# ----------------------------------------------------------------------------------------------------
def _ref_byte(a: int, b: int) -> int:
    """Independent bit-level spec: byte = (a << 4) | (b & 0xF), as a signed byte."""
    u = ((a & 0xF) << 4) | (b & 0xF)
    return int(np.array([u], dtype=np.uint8).view(np.int8)[0])


def _ref_nibbles(byte: int):
    u = byte & 0xFF
    hi, lo = u >> 4, u & 0xF
    return (hi - 16 if hi >= 8 else hi), (lo - 16 if lo >= 8 else lo)


def test_int4_pack_matches_bit_level_reference():
    vals = range(-8, 8)
    pairs = [(a, b) for a in vals for b in vals]  # all 256 combinations, incl. -8 and 7 edges
    q = torch.tensor(pairs, dtype=torch.int8).reshape(1, -1)  # [1, 512]: a0 b0 a1 b1 ...
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (1, 256)
    expected = [_ref_byte(a, b) for a, b in pairs]
    assert packed[0].tolist() == expected
    # every byte value 0..255 occurs exactly once
    assert sorted(int(x) & 0xFF for x in packed[0].tolist()) == list(range(256))
    # decoding, against the independent per-value decoder and as a round trip
    unpacked = unpack_int4(packed)
    assert unpacked.dtype == torch.int8
    assert unpacked[0].tolist() == [v for p in pairs for v in p]
    assert [v for byte in packed[0].tolist() for v in _ref_nibbles(byte)] == unpacked[0].tolist()
    # spot checks of the layout: high nibble = element 2j
    assert pack_int4(torch.tensor([[-8, 7]], dtype=torch.int8)).tolist() == [[-128 + 7]]   # 0x87
    assert pack_int4(torch.tensor([[7, -8]], dtype=torch.int8)).tolist() == [[0x78]]
    assert pack_int4(torch.tensor([[-1, -1]], dtype=torch.int8)).tolist() == [[-1]]        # 0xFF


def test_int4_pack_random_round_trip_and_errors():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (33, 70), generator=g).to(torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (33, 35)
    assert torch.equal(unpack_int4(packed), q)
    with pytest.raises(ValueError, match="even"):
        pack_int4(q[:, :5])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))


# ----------------------------------------------------------------------------------------------------
# per-row quantization
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_row_quantization_error_bound(bits, dtype):
    g = torch.Generator().manual_seed(bits)
    out_f, in_f = 37, 48
    row_scale = torch.logspace(-3, 1, out_f)[:, None]  # rows of very different magnitude
    w = (torch.randn(out_f, in_f, generator=g) * row_scale)
    w[5] = 0.0  # an all-zero row must not divide by zero
    w[6, 3] = -w[6].abs().max() * 2  # negative row maximum
    w = w.to(dtype)
    qw, scale = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert qw.dtype == torch.int8
    assert qw.shape == (out_f, in_f * bits // 8)
    assert scale.dtype == dtype and scale.shape == (out_f,)
    w32 = w.float()
    torch.testing.assert_close(scale.float(), (w32.abs().amax(1) / qmax).to(dtype).float(), rtol=0, atol=0)
    q = unpack_int4(qw) if bits == 4 else qw
    assert int(q.abs().max()) <= qmax
    assert torch.equal(q[5], torch.zeros_like(q[5]))
    # the row maximum hits the end of the range exactly
    assert int(q[6, 3]) == -qmax
    deq = dequantize(qw, scale, bits, torch.float32)
    err = (w32 - deq).abs()
    bound = scale.float()[:, None] / 2
    eps = 1e-6 * w32.abs().amax(1, keepdim=True) + 1e-12
    assert bool((err <= bound + eps).all()), float((err - bound).max())
    # dequantize_weight on a layer gives the same thing
    lin = nn.Linear(in_f, out_f).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    ql = QuantizedLinear.from_float(lin, bits)
    assert torch.equal(dequantize_weight(ql, torch.float32), deq)
    assert dequantize_weight(ql).dtype == dtype


# ----------------------------------------------------------------------------------------------------
# whole model: error bounds
# ----------------------------------------------------------------------------------------------------
def _rho(state, paths):
    """max over the quantized layers of mean_rows(max|W_row| / rms(W_row))."""
    vals = []
    for p in paths:
        w = state[p + ".weight"].float()
        vals.append((w.abs().amax(1) / w.pow(2).mean(1).sqrt()).mean())
    return float(torch.stack(vals).max())


def _logit_bound(bits, n_linears, rho, safety=2.0):
    # Relative (to the fp32 logits) error budget, derived from the per-weight error:
    #  * each quantized weight is off by at most s/2 with s = max|W_row|/qmax, i.e. <= max|W_row|/254
    #    (int8) or <= max|W_row|/14 (int4); treated as independent uniform rounding errors their rms is
    #    s/sqrt(12);
    #  * for an input x, Δy_i = Σ_j e_ij x_j has rms ≈ s_i/sqrt(12)·|x|, while y_i ≈ rms(W_row)·|x|: the
    #    relative output error of one linear is ≈ rho / (qmax·sqrt(12)), rho = max|W_row|/rms(W_row);
    #  * the signal goes through n_linears quantized linears; to first order their errors add, and
    #    being independent they add in quadrature (sqrt(n)); LayerNorms renormalise, so they do not
    #    grow; the post-LN residual scaling (alpha) only damps them, for which no credit is taken;
    #  * a safety factor of 2 for the statistics of a few thousand logits.
    # The int4 bound is therefore 127/7 ≈ 18x looser than the int8 one.
    qmax = 2 ** (bits - 1) - 1
    return safety * math.sqrt(n_linears) * rho / (qmax * math.sqrt(12))


@pytest.mark.parametrize("targets", ["glm", "all"])
def test_quantized_logits_close_to_fp32(float_state, batch, targets):
    ref = _logits(_build(float_state), batch)
    assert ref.shape == (2, 12, 1000) and torch.isfinite(ref).all()
    paths = _glm_paths() + (["mixins.chatglm-final.lm_head"] if targets == "all" else [])
    n_linears = 4 * NUM_LAYERS + (1 if targets == "all" else 0)
    rho = _rho(float_state, paths)
    errors = {}
    for bits in (8, 4):
        m = quantize(_build(float_state), bits, targets=targets)
        out = _logits(m, batch)
        assert out.dtype == ref.dtype and torch.isfinite(out).all()
        diff = out - ref
        rel_rms = float(diff.norm() / ref.norm())
        rel_max = float(diff.abs().max() / ref.abs().max())
        bound = _logit_bound(bits, n_linears, rho)
        # measured (this config): glm int8 ~1e-4 / int4 ~2e-3; all int8 ~6e-3 / int4 ~0.11;
        # bounds (rho ~3.1): glm 0.039 / 0.71, all 0.042 / 0.76
        assert rel_rms <= bound, (targets, bits, rel_rms, bound)
        assert rel_max <= bound, (targets, bits, rel_max, bound)
        assert diff.abs().max() > 0  # something was actually quantized
        errors[bits] = rel_rms
    assert _logit_bound(4, n_linears, rho) > _logit_bound(8, n_linears, rho)
    assert errors[8] < errors[4]


@pytest.mark.parametrize("bits", [8, 4])
def test_each_quantized_linear_obeys_the_rigorous_bound(float_state, batch, bits):
    """Within the quantized model, every layer's output y_q on the input x it actually received obeys
    |y_q - (x W^T + b)| <= |x| (s/2)^T elementwise (W: the float weight, s: per-row scale)."""
    m = quantize(_build(float_state), bits, targets="all")
    seen = {}
    hooks = []
    for name, mod in m.named_modules():
        if isinstance(mod, QuantizedLinear):
            hooks.append(mod.register_forward_hook(
                lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0].detach(), out.detach()))))
    _logits(m, batch)
    for h in hooks:
        h.remove()
    assert set(seen) == set(_glm_paths() + ["mixins.chatglm-final.lm_head"])
    for name, (x, y) in seen.items():
        w = float_state[name + ".weight"]
        b = float_state.get(name + ".bias")
        y_ref = F.linear(x, w, b)
        s = m.get_submodule(name).weight_scale.float()
        bound = x.abs().sum(-1, keepdim=True) * (s / 2)  # sum_j |x_j| * s_i/2
        tol = 1e-5 * (x.abs() @ w.abs().T) + 1e-6
        assert bool(((y - y_ref).abs() <= bound + tol).all()), name


# ----------------------------------------------------------------------------------------------------
# scope / structure
# ----------------------------------------------------------------------------------------------------
def test_targets_glm_vs_all(float_state, batch):
    m = _build(float_state)
    originals = {p: m.get_submodule(p) for p in _glm_paths() + ["mixins.chatglm-final.lm_head"]}
    quantize(m, 8)  # default targets='glm'
    for p in _glm_paths():
        new = m.get_submodule(p)
        assert isinstance(new, QuantizedLinear), p
        old = originals[p]
        assert new.parallel == ("column" if isinstance(old, ColumnParallelLinear) else "row")
        attrs = (["stride", "input_size", "output_size", "gather_output", "output_size_per_partition"]
                 if isinstance(old, ColumnParallelLinear) else
                 ["input_size", "output_size", "input_is_parallel", "input_size_per_partition", "final_bias"])
        for a in attrs:
            assert getattr(new, a) == getattr(old, a), (p, a)
        assert new.bias is old.bias  # bias kept as is
    assert m.transformer.layers[0].attention.query_key_value.stride == 3
    lm_head = m.get_submodule("mixins.chatglm-final.lm_head")
    assert type(lm_head) is ColumnParallelLinear and lm_head is originals["mixins.chatglm-final.lm_head"]
    n_q = sum(isinstance(x, QuantizedLinear) for x in m.modules())
    assert n_q == 4 * NUM_LAYERS

    quantize(m, 8, targets="all")  # adds lm_head, leaves the already quantized layers alone
    assert isinstance(m.get_submodule("mixins.chatglm-final.lm_head"), QuantizedLinear)
    assert sum(isinstance(x, QuantizedLinear) for x in m.modules()) == 4 * NUM_LAYERS + 1
    # no ColumnParallelLinear / RowParallelLinear left anywhere
    assert not any(isinstance(x, (ColumnParallelLinear, RowParallelLinear)) for x in m.modules())
    # int8 weights are buffers, so sat's `next(model.parameters()).dtype` (lm_head is the first
    # parameter of a ChatGLMModel) stays a float and its default mask path still works
    assert next(m.parameters()).is_floating_point()
    ids = batch[0]
    with torch.no_grad():
        out = m(ids)[0]
    assert out.shape == (2, 12, 1000) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="already quantized"):
        quantize(m, 4, targets="all")


def test_quantize_transformer_directly_and_bare_modules():
    m = _build()
    quantize(m.transformer, 4)  # like the original quantize(model.transformer, q)
    assert all(isinstance(m.get_submodule(p), QuantizedLinear) for p in _glm_paths())

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 10)
            self.col = ColumnParallelLinear(10, 8, gather_output=True)
            self.inner = nn.Sequential(RowParallelLinear(8, 4, bias=False))

        def forward(self, x):
            return self.inner(self.col(self.proj(x)))

    t = Tiny()
    x = torch.randn(3, 6)
    quantize(t, 8)  # no `.transformer`: the module itself is the scope; nn.Linear untouched
    assert type(t.proj) is nn.Linear
    assert isinstance(t.col, QuantizedLinear) and isinstance(t.inner[0], QuantizedLinear)
    assert t.inner[0].bias is None
    quantize(t, 8, include_nn_linear=True)
    assert isinstance(t.proj, QuantizedLinear) and t.proj.parallel == "none"
    ref = F.linear(F.linear(F.linear(x, dequantize_weight(t.proj), t.proj.bias),
                            dequantize_weight(t.col), t.col.bias), dequantize_weight(t.inner[0]))
    with torch.no_grad():
        torch.testing.assert_close(t(x), ref)


def test_visualglm_scope_includes_vision_tower_only_with_all():
    """On the project's VisualGLMModel: 'glm' leaves the image mixin alone, 'all' quantizes the EVA /
    Q-Former sat linears too, and glm_proj (a plain nn.Linear) only with include_nn_linear."""
    checkpoint = pytest.importorskip("model.sat.checkpoint")
    configs = pytest.importorskip("model.configs")
    cfg = configs.tiny_config()
    base = checkpoint.build_model(cfg, device="cpu").eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "layernorm" not in name and "ln_vision" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    L = cfg["image_length"]
    S, ctx = 1 + L + 7, 1 + L + 5
    ids = torch.randint(10, cfg["vocab_size"], (1, S), generator=g)
    ids[0, ctx - 2], ids[0, ctx - 1] = cfg["gmask_token_id"], cfg["bos_token_id"]
    pos = torch.cat([torch.arange(ctx), torch.full((S - ctx,), ctx - 2)])
    block = torch.cat([torch.zeros(ctx, dtype=torch.long), torch.arange(1, S - ctx + 1)])
    position_ids = torch.stack([pos, block])[None]
    mask = torch.ones(1, 1, S, S).tril()
    mask[..., :ctx] = 1
    image = torch.rand(1, 3, 224, 224, generator=g)

    def logits(m):
        with torch.no_grad():
            return m(ids, position_ids=position_ids, attention_mask=mask, image=image, pre_image=1)[0]

    def fresh():
        m = checkpoint.build_model(cfg, device="cpu").eval()
        m.load_state_dict(state)
        return m

    ref = logits(base)
    in_eva = lambda m: [n for n, x in m.named_modules() if n.startswith("mixins.eva") and isinstance(x, QuantizedLinear)]
    m = quantize(fresh(), 8)
    assert in_eva(m) == []
    errors = {}
    for bits in (8, 4):
        m = quantize(fresh(), bits, targets="all")
        assert len(in_eva(m)) > 0
        assert type(m.get_mixin("eva").model.glm_proj) is nn.Linear
        assert not any(isinstance(x, (ColumnParallelLinear, RowParallelLinear)) for x in m.modules())
        out = logits(m)
        assert torch.isfinite(out).all()
        errors[bits] = float((out - ref).norm() / ref.norm())
    assert errors[8] < errors[4] < 1.0
    assert errors[8] < 0.05
    m = quantize(fresh(), 8, targets="all", include_nn_linear=True)
    assert isinstance(m.get_mixin("eva").model.glm_proj, QuantizedLinear)
    assert torch.isfinite(logits(m)).all()


def test_float_layers_are_released_one_by_one(monkeypatch):
    """Each float layer is freed as soon as it is replaced (not only at the end, and without waiting
    for the cycle collector), so peak memory stays about one float layer above the quantized model."""
    import gc
    import weakref

    m = _build()
    gc.collect()
    gc.disable()
    try:
        refs = []
        original = QuantizedLinear.from_float.__func__

        def spy(cls, linear, bits, **kw):
            # every float layer handled before this one must be gone already
            assert all(r() is None for r in refs), "an earlier float layer is still alive"
            refs.append(weakref.ref(linear.weight))
            return original(cls, linear, bits, **kw)

        monkeypatch.setattr(QuantizedLinear, "from_float", classmethod(spy))
        quantize(m, 8, targets="all")
        assert len(refs) == 4 * NUM_LAYERS + 1
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_progress_bar_only_for_many_layers(capsys):
    quantize(nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)]), 8, include_nn_linear=True)
    assert "quantization" not in capsys.readouterr().err
    quantize(nn.Sequential(*[nn.Linear(4, 4) for _ in range(51)]), 8, include_nn_linear=True)
    assert "int8 quantization" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# state dict
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_round_trip(float_state, batch, bits, tmp_path):
    a = quantize(_build(float_state), bits, targets="all")
    sd = a.state_dict()
    p = "transformer.layers.0.attention.query_key_value"
    assert {k for k in sd if k.startswith(p + ".")} == {p + ".weight", p + ".weight_scale", p + ".bias"}
    assert sd[p + ".weight"].dtype == torch.int8
    assert tuple(sd[p + ".weight"].shape) == (192, 64 * bits // 8)
    assert sd[p + ".weight_scale"].dtype == torch.float32 and sd[p + ".weight_scale"].shape == (192,)
    assert set(k for k in sd if "lm_head" in k) == {"mixins.chatglm-final.lm_head.weight",
                                                    "mixins.chatglm-final.lm_head.weight_scale"}
    torch.save(sd, tmp_path / "q.pt")
    loaded = torch.load(tmp_path / "q.pt", weights_only=True)
    expected = _logits(a, batch)

    # a freshly built model (different float weights), quantized, then loaded
    b = _build()
    quantize(b, bits, targets="all")
    assert not torch.equal(_logits(b, batch), expected)
    b.load_state_dict(loaded)  # strict
    assert torch.equal(_logits(b, batch), expected)

    # same with an empty quantized skeleton (weights never read)
    c = quantize(_build(), bits, targets="all", empty_init=True)
    c.load_state_dict(loaded)
    assert torch.equal(_logits(c, batch), expected)

    # a float checkpoint loaded into a quantized skeleton is quantized on load, identically
    d = quantize(_build(), bits, targets="all", empty_init=True)
    d.load_state_dict(float_state)
    assert torch.equal(_logits(d, batch), expected)


# ----------------------------------------------------------------------------------------------------
# dtypes, autograd, replaceable compute function
# ----------------------------------------------------------------------------------------------------
def test_fp16_model(float_state, batch):
    ref = _logits(_build(float_state), batch)
    m = _build(float_state).half()
    quantize(m, 8)
    qkv = m.transformer.layers[0].attention.query_key_value
    assert qkv.weight_scale.dtype == torch.float16 and qkv.bias.dtype == torch.float16
    out = _logits(m, batch)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 0.02  # fp16 + int8 noise


def test_model_half_after_quantization_converts_scale(float_state):
    m = quantize(_build(float_state), 4)
    m.half()
    qkv = m.transformer.layers[0].attention.query_key_value
    assert qkv.weight.dtype == torch.int8 and qkv.weight_scale.dtype == torch.float16


@pytest.mark.parametrize("bits", [8, 4])
def test_backward_reaches_inputs_and_bias(bits):
    lin = nn.Linear(16, 12)
    ql = QuantizedLinear.from_float(lin, bits)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = ql(x)
    w = dequantize_weight(ql)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, w, lin.bias.detach())
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ql.bias.grad, g.sum((0, 1)))
    assert not ql.weight.requires_grad and not ql.weight_scale.requires_grad


def test_linear_forward_is_the_single_replaceable_entry(monkeypatch):
    ql = QuantizedLinear.from_float(nn.Linear(8, 4), 4)
    calls = []
    original = Q._linear_forward

    def spy(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(Q, "_linear_forward", spy)
    ql(torch.randn(3, 8))
    assert calls == [4]


# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [0, 1, 2, 3, 5, 16, 32, 8.0, "8", True, None])
def test_bad_bits_raise(bits):
    m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="only 8 .* and 4"):
        quantize(m, bits, include_nn_linear=True)
    with pytest.raises(ValueError):
        quantize_weight(torch.randn(4, 4), bits)
    with pytest.raises(ValueError):
        QuantizedLinear(4, 4, bits)


def test_other_errors():
    with pytest.raises(ValueError, match="targets"):
        quantize(nn.Linear(4, 4), 8, targets="vision")
    # odd in_features with int4: clear error, model left untouched
    m = nn.Sequential(nn.Linear(4, 6), nn.Linear(7, 3))
    with pytest.raises(ValueError, match="even number of input features"):
        quantize(m, 4, include_nn_linear=True)
    assert type(m[0]) is nn.Linear and type(m[1]) is nn.Linear
    quantize(m, 8, include_nn_linear=True)  # int8 has no such constraint
    assert isinstance(m[1], QuantizedLinear)
    # meta device
    meta = nn.Sequential(ColumnParallelLinear(8, 6, skip_init=True, device=torch.device("meta")))
    with pytest.raises(ValueError, match="meta"):
        quantize(meta, 8)
    assert type(meta[0]) is ColumnParallelLinear
    quantize(meta, 8, empty_init=True)  # allowed: to be filled from a state dict
    assert meta[0].weight.is_meta and meta[0].weight.dtype == torch.int8
    with pytest.raises(TypeError):
        quantize_weight(torch.zeros(2, 2, dtype=torch.int8), 8)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]), 8)
