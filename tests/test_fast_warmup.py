"""Start-up capture of the continuous batch's CUDA graphs (FastSlots.warm_up, FastImageEncoder.warm_up):
after it, decoding at every (slots, span) bucket and encoding any number of images replay graphs and
never capture, with the results of the eager runs. On the CPU the graph mechanics are stood in for by a
recorder whose replay reruns the recorded function over the same static tensors (what a CUDA graph does);
the real captures run in the GPU test, which skips here with a message."""
import pytest
import torch

from model.backend import open_slots
from model.fast import FastBackend
from model.fast.slot_prefill import row_buckets
from model.fast.slots import FastSlots
from model.fast.vision import BATCHES, FastImageEncoder, shared_image_encoder
from model.sat.checkpoint import build_model
from conftest import GRAPH_MODULES, randomize

NO_GPU = "CUDA graph capture needs an NVIDIA GPU; benchmarks/bench_serving.py runs the warm-up there"


@pytest.fixture(scope="module")
def net(tiny_config):
    return randomize(build_model(tiny_config, device="cpu"), seed=5).eval()


def no_more_captures(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("captured after warm_up")         # not an Exception: try_record's fallback cannot catch it
    for module in GRAPH_MODULES:
        monkeypatch.setattr(module, "record", refuse)


def decode_every_bucket(slots):
    """One decode per (slots, span) bucket, with fewer live rows than the bucket where it has room
    -> the logits of each (kept: every later replay reuses the graphs' output memory)."""
    out = []
    for rows in slots.slot_buckets:
        n = rows // 2 + 1
        for span in slots.span_buckets:
            index = [span - 1 - r for r in range(n)]                       # the longest reaches the span
            out.append(slots.decode([20 + 3 * r for r in range(n)], [(i, r % 2) for r, i in enumerate(index)], index))
    return out


def test_warm_up_off_a_gpu_captures_nothing(net):
    backend = FastBackend(net)
    slots = open_slots(backend, 4)                    # what the server calls; warms up on CUDA only
    assert slots.warm_up() == 0 and not slots._graphs and not backend.vision.graphs
    assert FastImageEncoder(shared_image_encoder(net), capture=False).warm_up((3, 224, 224), torch.float32, "cpu") == 0


def test_cuda_graphs_forced_on_cpu_tensors_are_refused(net, caplog):
    slots = FastSlots(FastBackend(net), slots=2, length=128, cuda_graph=True)
    with pytest.raises(RuntimeError, match="CUDA graphs capture CUDA work only"):
        slots.warm_up()
    with pytest.raises(RuntimeError, match="CUDA graphs capture CUDA work only"):
        slots.decode([20], [(1, 0)], [0])
    encoder = FastImageEncoder(shared_image_encoder(net), capture=True)     # the encoder falls back instead
    assert encoder.warm_up((3, 224, 224), torch.float32, "cpu") == 0
    assert not encoder.capture and "image encoder: CUDA graph capture failed" in caplog.text


def test_after_warm_up_every_bucket_replays_and_equals_eager(net, fake_graphs, monkeypatch):
    backend = FastBackend(net)
    graphs = FastSlots(backend, slots=5, length=300, cuda_graph=True)
    eager = FastSlots(backend, slots=5, length=300, cuda_graph=False)
    backend.vision.capture = True
    buckets = len(graphs.slot_buckets) * len(graphs.span_buckets)           # 4 x 3
    waves = len(graphs.prefiller.buckets())                                  # slots 1, 2, 4, 5 x 64, 128, 256
    assert waves == 12 and graphs.warm_up() == buckets + waves + len(BATCHES) == len(fake_graphs["pools"])
    assert len(set(map(id, fake_graphs["pools"][:buckets + waves]))) == 1    # one pool: decode and prefill
    no_more_captures(monkeypatch)
    with torch.inference_mode():
        got, want = decode_every_bucket(graphs), decode_every_bucket(eager)
        assert len(got) == buckets and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
        pixels = torch.randn(2 * BATCHES[-1] + 3, 3, 224, 224)              # two whole chunks and 3
        assert torch.allclose(backend.vision(pixels), backend.vision.encoder(pixels), atol=1e-5, rtol=1e-4)
    assert len(fake_graphs["replays"]) == buckets + 3
    assert graphs.warm_up() == 0                                             # captured once


def test_a_wave_pads_to_the_next_multiple_of_four_prompts(net):
    """Waves of a burst come in any size: past 2 prompts their buckets step by 4, not by doubling."""
    assert row_buckets(64) == [1, 2] + list(range(4, 65, 4))
    assert row_buckets(5) == [1, 2, 4, 5] and row_buckets(1) == [1] and row_buckets(6) == [1, 2, 4, 6]
    prefill = FastSlots(FastBackend(net), slots=64, length=300, cuda_graph=False).prefiller
    assert [prefill.bucket_for(n, 50) for n in (1, 3, 9, 13, 20, 64)] == [(1, 64), (4, 64), (12, 64), (16, 64),
                                                                          (20, 64), (64, 64)]
    assert prefill.bucket_for(21, 100) == (24, 128) and prefill.bucket_for(40, 100) is None   # 40 x 128 > 4096


def test_every_image_batch_up_to_the_chunk_has_its_own_graph(net, fake_graphs):
    """A wave's images are not padded: 13 replay the graph of 13, 19 those of 16 and 3."""
    encoder = FastImageEncoder(FastBackend(net).vision.encoder, capture=True)
    assert encoder.warm_up((3, 224, 224), torch.float32, "cpu") == len(BATCHES) == BATCHES[-1]
    size_of = {id(g.graph): batch for batch, g in encoder.graphs.items()}
    with torch.inference_mode():
        for n in (13, 19, 1):
            encoder(torch.randn(n, 3, 224, 224))
    assert [size_of[id(r)] for r in fake_graphs["replays"]] == [13, 16, 3, 1]


def gpu_backend(net, config) -> FastBackend:
    """The tiny model's weights on the GPU behind a FastBackend that captures nothing itself (skips
    without a GPU)."""
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    gpu = build_model(config, device="cuda").eval()
    gpu.load_state_dict(net.state_dict())
    return FastBackend(gpu, cuda_graph=False, compile=False)


def test_warm_up_on_the_gpu_captures_every_bucket_once_and_replays_equal_eager(net, tiny_config, monkeypatch):
    backend = gpu_backend(net, tiny_config)
    graphs = FastSlots(backend, slots=4, length=256, cuda_graph=True)
    eager = FastSlots(backend, slots=4, length=256, cuda_graph=False)
    encoder = FastImageEncoder(backend.vision.encoder, capture=True)
    backend.vision = encoder
    assert graphs.warm_up() == 3 * 2 + 3 * 3 + len(BATCHES) and len(graphs._graphs) == 6
    # the graphs keep no autograd state alive (the model's parameters require grad)
    assert not any(g.out.requires_grad for g in encoder.graphs.values()) and next(encoder.encoder.parameters()).requires_grad
    assert sorted(graphs.prefiller.graphs) == [(r, n) for r in (1, 2, 4) for n in (64, 128, 256)]
    no_more_captures(monkeypatch)
    with torch.inference_mode():
        got, want = decode_every_bucket(graphs), decode_every_bucket(eager)
        assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(got, want))
        pixels = torch.randn(19, 3, 224, 224, device="cuda")
        assert torch.allclose(encoder(pixels), encoder.encoder(pixels), atol=1e-4, rtol=1e-4)
    assert len(graphs._graphs) == 6 and sorted(encoder.graphs) == list(BATCHES)


def prefill_waves(slots, config):
    """Waves of left-padded prompts (with and without image slots) into chosen slots, as admission does
    -> the logits of each wave and, per wave, each row's keys and values at its real cache indices."""
    from model.positions import batch_inputs
    g, b, L = config["gmask_token_id"], config["bos_token_id"], config["image_length"]
    torch.manual_seed(0)
    image = torch.randn(L, config["hidden_size"])
    out = []
    for rows, lengths in (([0], [7]), ([1, 3, 2], [5, 40, 12]), ([4], [70]), ([0, 1, 2, 3, 4], [3, 9, 4, 30, 6])):
        ids = [[20 + (j * 5 + len(rows)) % 30 for j in range(n)] + [g, b] for n in lengths]
        if len(rows) == 3:                                       # one row has image slots
            ids[1] = [20, 21] + [3] * L + ids[1]
        x, positions, mask, pads = batch_inputs(ids, 3, dtype=torch.bool)
        embeds = torch.stack([image] * len(rows)) if len(rows) == 3 else None
        pre = torch.tensor([-1, 2, -1]) if len(rows) == 3 else None
        logits = slots.prefill(rows, x, positions, mask, embeds, pre, pads=pads).clone()
        kv = [(slots.pool.k[layer][row, :, :len(q)].clone(), slots.pool.v[layer][row, :, :len(q)].clone())
              for layer in (0, len(slots.pool.k) - 1) for row, q in zip(rows, ids)]
        out.append((logits, kv))
    return out


def test_prefill_waves_replay_their_bucket_and_equal_eager(net, tiny_config, fake_graphs, monkeypatch):
    """After warm_up, waves of 1 to 5 prompts (one past the 64-position bucket) replay a captured bucket:
    the same logits, and the same keys and values in their slots, as the eager prefill; a later wave's pad
    rows leave earlier slots as they were."""
    backend = FastBackend(net)
    graphs = FastSlots(backend, slots=5, length=300, cuda_graph=True)
    eager = FastSlots(backend, slots=5, length=300, cuda_graph=False)
    graphs.warm_up()
    no_more_captures(monkeypatch)
    replays = len(fake_graphs["replays"])
    with torch.inference_mode():
        got, want = prefill_waves(graphs, tiny_config), prefill_waves(eager, tiny_config)
    assert len(fake_graphs["replays"]) == replays + 4                       # every wave replayed a graph
    assert_same_waves(got, want, graphs, eager, 1e-5)


def assert_same_waves(got, want, graphs, eager, atol):
    """Same logits and keys / values per wave; and nothing written anywhere else: right pads, and the pad
    row of the 3-prompt wave (bucket of 4), went only to the masked last index of their slots (the eager
    run's left pads go there too)."""
    for (logits, kv), (logits_e, kv_e) in zip(got, want):
        assert torch.allclose(logits, logits_e, atol=1e-4, rtol=1e-4)
        assert all(torch.allclose(a, b, atol=atol) and torch.allclose(c, d, atol=atol)
                   for (a, c), (b, d) in zip(kv, kv_e))
    for cache, cache_e in ((graphs.pool.k, eager.pool.k), (graphs.pool.v, eager.pool.v)):
        assert all(torch.allclose(a[:, :, :-1], b[:, :, :-1], atol=atol) for a, b in zip(cache, cache_e))


def test_prefill_waves_replay_captured_graphs_on_the_gpu(net, tiny_config, monkeypatch):
    """The same waves through real CUDA graphs (fp32, tiny model)."""
    backend = gpu_backend(net, tiny_config)
    graphs = FastSlots(backend, slots=5, length=300, cuda_graph=True)
    eager = FastSlots(backend, slots=5, length=300, cuda_graph=False)
    graphs.warm_up()
    no_more_captures(monkeypatch)
    with torch.inference_mode():
        got, want = prefill_waves(graphs, tiny_config), prefill_waves(eager, tiny_config)
    assert_same_waves(got, want, graphs, eager, 1e-4)


def test_a_failed_prefill_capture_warns_and_runs_eagerly(net, tiny_config, caplog):
    """Captures asked for on the CPU fail: a wave warns once and is prefilled eagerly, with the eager
    results, as are the waves after it (no new attempt)."""
    backend = FastBackend(net)
    graphs = FastSlots(backend, slots=5, length=300, cuda_graph=True)
    eager = FastSlots(backend, slots=5, length=300, cuda_graph=False)
    with torch.inference_mode():
        got, want = prefill_waves(graphs, tiny_config), prefill_waves(eager, tiny_config)
    assert_same_waves(got, want, graphs, eager, 1e-6)
    assert not graphs.prefiller.capture and not graphs.prefiller.graphs
    assert caplog.text.count("prefill of a wave: CUDA graph capture failed") == 1
