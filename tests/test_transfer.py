"""model/transfer.py: copies between host and GPU through a ring of page-locked buffers."""
import pytest
import torch

from model.transfer import PinnedRing

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: page-locked copies exist only there")


def test_off_the_gpu_the_ring_hands_plain_tensors_through():
    ring = PinnedRing(depth=2)
    t = ring.to_device([[1, 2], [3, 4]], torch.long, "cpu")
    assert t.dtype == torch.long and t.tolist() == [[1, 2], [3, 4]]
    assert ring.to_host(torch.tensor([5.5, 6.0])).wait() == [5.5, 6.0]


@gpu
def test_values_survive_many_rounds_of_reused_and_grown_buffers():
    ring = PinnedRing(depth=3)
    copies = []
    for i in range(20):                                  # sizes grow and shrink: buffers are reused and grown
        values = [[i * 1000 + j, -j] for j in range(1 + (i * 37) % 300)]
        x = ring.to_device(values, torch.long, "cuda")
        f = ring.to_device([v[0] / 7 for v in values], torch.float64, "cuda")
        copies.append((values, ring.to_host(x * 2), ring.to_host(f.float())))
        assert x.is_cuda and x.tolist() == values
    for values, doubled, floats in copies[-1:]:          # the last ones: their buffers were not reused since
        assert doubled.wait() == [[2 * a, 2 * b] for a, b in values]
        assert floats.wait() == torch.tensor([v[0] / 7 for v in values]).float().tolist()


@gpu
def test_copies_start_without_waiting_for_a_busy_gpu():
    ring = PinnedRing(depth=2)
    ring.to_host(torch.arange(6, device="cuda")).wait()  # both buffers exist (allocating one may wait)
    ring.to_device([1, 2, 3], torch.long, "cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)                       # the GPU is busy for ~0.1 s
    up = ring.to_device([7, 8, 9], torch.long, "cuda")
    down = ring.to_host(up * 2)
    assert not down._done.query(), "the copies waited for the GPU"   # the host got here first
    assert down.wait() == [14, 16, 18]


@gpu
def test_a_copy_not_read_before_its_buffer_comes_round_again_keeps_its_values():
    ring = PinnedRing(depth=2)
    first = ring.to_host(torch.arange(3, device="cuda"))
    ring.to_host(torch.arange(4, device="cuda")).wait()
    third = ring.to_host(torch.arange(5, device="cuda") + 10)       # first's turn: a new buffer
    assert first.wait() == [0, 1, 2] and third.wait() == [10, 11, 12, 13, 14]
