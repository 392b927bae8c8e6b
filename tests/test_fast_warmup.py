"""Start-up capture of the continuous batch's CUDA graphs (FastSlots.warm_up, FastImageEncoder.warm_up):
after it, decoding at every (slots, span) bucket and encoding any number of images replay graphs and
never capture, with the results of the eager runs. On the CPU the graph mechanics are stood in for by a
recorder whose replay reruns the recorded function over the same static tensors (what a CUDA graph does);
the real captures run in the GPU test, which skips here with a message."""
import pytest
import torch

import model.fast.slots as slots_module
import model.fast.vision as vision_module
from model.backend import open_slots
from model.fast import FastBackend
from model.fast.slots import FastSlots
from model.fast.vision import BATCHES, FastImageEncoder, shared_image_encoder
from model.sat.checkpoint import build_model
from conftest import randomize

NO_GPU = "CUDA graph capture needs an NVIDIA GPU; benchmarks/bench_serving.py runs the warm-up there"


@pytest.fixture(scope="module")
def net(tiny_config):
    return randomize(build_model(tiny_config, device="cpu"), seed=5).eval()


@pytest.fixture
def fake_graphs(monkeypatch):
    """CUDA graphs on the CPU: recording runs once and logs its pool, replay reruns over the static
    tensors and logs itself."""
    log = dict(pools=[], replays=[])

    class Replayed:
        def __init__(self, run, out):
            self.run, self.out = run, out

        def replay(self):
            log["replays"].append(self)
            self.out.copy_(self.run())

    def record(run, warmups=1, pool=None):
        log["pools"].append(pool)
        out = run()
        return Replayed(run, out), out
    for module in (slots_module, vision_module):
        monkeypatch.setattr(module, "record", record)
        monkeypatch.setattr(module, "require_cuda", lambda tensor: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)   # on a GPU machine these
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)                 # refuse the CPU device
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return log


def no_more_captures(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("captured after warm_up")
    for module in (slots_module, vision_module):
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
    assert graphs.warm_up() == buckets + len(BATCHES) == len(fake_graphs["pools"])
    assert len(set(map(id, fake_graphs["pools"][:buckets]))) == 1            # one pool for the decode graphs
    no_more_captures(monkeypatch)
    with torch.inference_mode():
        got, want = decode_every_bucket(graphs), decode_every_bucket(eager)
        assert len(got) == buckets and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
        pixels = torch.randn(19, 3, 224, 224)                                # chunks of 8, 8 and 3 (as 4)
        assert torch.allclose(backend.vision(pixels), backend.vision.encoder(pixels), atol=1e-5, rtol=1e-4)
    assert len(fake_graphs["replays"]) == buckets + 3
    assert graphs.warm_up() == 0                                             # captured once


def test_warm_up_on_the_gpu_captures_every_bucket_once_and_replays_equal_eager(net, tiny_config, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    gpu = build_model(tiny_config, device="cuda").eval()
    gpu.load_state_dict(net.state_dict())
    backend = FastBackend(gpu, cuda_graph=False, compile=False)
    graphs = FastSlots(backend, slots=4, length=256, cuda_graph=True)
    eager = FastSlots(backend, slots=4, length=256, cuda_graph=False)
    encoder = FastImageEncoder(backend.vision.encoder, capture=True)
    backend.vision = encoder
    assert graphs.warm_up() == 3 * 2 + len(BATCHES) and len(graphs._graphs) == 6
    no_more_captures(monkeypatch)
    with torch.inference_mode():
        got, want = decode_every_bucket(graphs), decode_every_bucket(eager)
        assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(got, want))
        pixels = torch.randn(19, 3, 224, 224, device="cuda")
        assert torch.allclose(encoder(pixels), encoder.encoder(pixels), atol=1e-4, rtol=1e-4)
    assert len(graphs._graphs) == 6 and sorted(encoder.graphs) == list(BATCHES)
