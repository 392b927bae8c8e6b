"""model/image_cache.py: batched image encoding, deduplication and the cache, with normalised float pixels
or with uint8 bytes (what a server sends to its model process)."""
import torch
from PIL import Image, ImageDraw

from model.backend import as_backend
from model.image import pixels_uint8, preprocess
from model.image_cache import ImageEncoder, pixels_key


def picture(colour):
    img = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(img).ellipse([40, 30, 220, 170], fill=colour)
    return img


class Counting:
    """A real backend, with its encode_image calls counted."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def encode_image(self, pixels):
        self.calls.append(pixels.shape[0])
        return self.backend.encode_image(pixels)


def test_uint8_pixels_encode_exactly_as_their_normalised_floats(tiny):
    model, _ = tiny
    backend = as_backend(model, "sat")
    size = backend.image_size
    red, blue = picture("red"), picture("blue")
    floats = ImageEncoder(backend, cache_size=0).encode([preprocess(red, size), preprocess(blue, size)])
    counting = Counting(backend)
    raw = ImageEncoder(counting, cache_size=0).encode([pixels_uint8(red, size), pixels_uint8(blue, size)[None],
                                                       pixels_uint8(red, size)])
    assert counting.calls == [2]                        # one call, the repeated picture once
    assert torch.equal(raw[0], floats[0]) and torch.equal(raw[1], floats[1]) and torch.equal(raw[2], floats[0])


def test_keys_tell_pictures_apart_and_bytes_from_floats(tiny):
    size = as_backend(tiny[0], "sat").image_size
    red, blue = pixels_uint8(picture("red"), size), pixels_uint8(picture("blue"), size)
    assert pixels_key(red) == pixels_key(red.clone()) != pixels_key(blue)
    assert pixels_key(red) != pixels_key(preprocess(picture("red"), size))
