"""Image reading and preprocessing."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.image import CLIP_MEAN, CLIP_STD, ImageLoadError, load_image, preprocess


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_preprocess_solid_colour_is_normalised_per_channel():
    x = preprocess(Image.new("RGB", (300, 120), (255, 0, 128)), 224)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    for c, v in enumerate((255, 0, 128)):
        expected = (v / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(x[0, c], torch.full((224, 224), expected), atol=1e-5)


def test_preprocess_resizes_bicubic_without_crop():
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    arr[:, 100:] = 255  # right half white
    x = preprocess(Image.fromarray(arr), 224)
    white = (1 - CLIP_MEAN[0]) / CLIP_STD[0]
    black = (0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert abs(x[0, 0, 100, 5] - black) < 1e-3 and abs(x[0, 0, 100, 218] - white) < 1e-3  # no crop: halves kept
    ref = np.asarray(Image.fromarray(arr).resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
    assert torch.allclose(x[0, 0], torch.from_numpy((ref[..., 0] - CLIP_MEAN[0]) / CLIP_STD[0]), atol=1e-5)


def test_sources(tmp_path):
    img = Image.new("RGBA", (10, 10), (1, 2, 3, 4))
    path = tmp_path / "a.png"
    img.save(path)
    for src in (img, str(path), path, png_bytes(img)):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (10, 10)


def test_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(str(tmp_path / "missing.jpg"))
    with pytest.raises(ImageLoadError, match="not a readable image"):
        load_image(b"GIF89a nonsense")
    data = png_bytes(Image.new("RGB", (64, 64), "red"))
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(data[: len(data) - 30])
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(png_bytes(Image.new("RGB", (300, 300))), max_pixels=10_000)
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(data, max_bytes=10)
    with pytest.raises(ImageLoadError, match="Unsupported"):
        load_image(12345)
    with pytest.raises(ImageLoadError, match="Could not download"):
        load_image("http://127.0.0.1:9/nothing.png")  # closed port on loopback: no network needed
