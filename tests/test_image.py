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


# -- only raster formats reach Pillow --------------------------------------------------------------------
# A minimal Encapsulated PostScript file: Pillow's EPS plugin recognises it, and would hand it to Ghostscript
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")
ACCEPTED = "not a PNG, JPEG, WebP, GIF, BMP or TIFF image"
RASTER = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")      # the formats Image.open may be asked to try


@pytest.fixture
def opened_formats(monkeypatch):
    """Records the `formats` argument of every Image.open call."""
    seen = []
    real_open = Image.open

    def recording_open(fp, mode="r", formats=None):
        seen.append(formats)
        return real_open(fp, mode, formats)
    monkeypatch.setattr(Image, "open", recording_open)
    return seen




def test_eps_bytes_and_files_are_refused_before_the_eps_plugin(eps_plugin, opened_formats, tmp_path):
    path = tmp_path / "photo.png"          # the name does not matter, only the bytes
    path.write_bytes(EPS)
    for source, what in ((EPS, "The image"), (path, str(path)), (str(path), str(path))):
        with pytest.raises(ImageLoadError) as info:
            load_image(source)
        assert str(info.value) == f"{what} is not a readable image: it is {ACCEPTED}."
    assert eps_plugin == []
    assert opened_formats and all(tuple(f or ()) == RASTER for f in opened_formats)


def test_ghostscript_is_never_run_on_eps(monkeypatch):
    # the plugin's own header parser left in place: only the Ghostscript call is watched
    from PIL import EpsImagePlugin
    calls = []

    def ghostscript(*args, **kwargs):
        calls.append(args)
        raise OSError("Ghostscript ran")
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    with pytest.raises(ImageLoadError) as info:
        load_image(EPS)
    assert calls == [], "Ghostscript was run on the client's bytes"
    assert ACCEPTED in str(info.value)


def test_open_image_refuses_eps_with_an_oserror(eps_plugin, tmp_path):
    # the helper fine-tuning data checks use: header only, same format list, an OSError like Image.open's
    from PIL import UnidentifiedImageError

    from model.image import open_image
    eps, png = tmp_path / "a.eps", tmp_path / "b.png"
    eps.write_bytes(EPS)
    Image.new("RGB", (5, 4)).save(png)
    with pytest.raises(UnidentifiedImageError, match=ACCEPTED):
        open_image(eps)
    with open_image(png) as img:
        assert img.format == "PNG" and img.size == (5, 4)
    assert eps_plugin == []


@pytest.mark.parametrize("fmt", RASTER)
def test_each_raster_format_decodes_through_the_format_list(fmt, opened_formats):
    buf = io.BytesIO()
    red, blue = Image.new("RGB", (12, 8), (200, 30, 30)), Image.new("RGB", (12, 8), (30, 30, 200))
    if fmt == "GIF":
        red.save(buf, format="GIF", save_all=True, append_images=[blue])   # animated: the first frame is used
    else:
        red.save(buf, format=fmt)
    out = load_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (12, 8)
    assert np.abs(np.asarray(out, dtype=int) - (200, 30, 30)).max() <= 12     # lossy JPEG / WebP, GIF palette
    assert [tuple(f or ()) for f in opened_formats] == [RASTER]


def test_error_messages_say_what_is_wrong_without_object_reprs(tmp_path):
    data = png_bytes(Image.new("RGB", (64, 64), "red"))
    garbage = b"hello, this is not an image at all"
    cases = [(garbage, f"The image is not a readable image: it is {ACCEPTED}."),
             (EPS, ACCEPTED),
             (data[: len(data) - 30], "truncated or corrupt"),
             (data[:40], "truncated or corrupt")]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(garbage)
    cases.append((bad, f"{bad} is not a readable image: it is {ACCEPTED}."))
    for source, expected in cases:
        with pytest.raises(ImageLoadError) as info:
            load_image(source)
        message = str(info.value)
        assert expected in message and "object at 0x" not in message and "<_io." not in message, message


# -- file:// URLs and download failures ------------------------------------------------------------------
def test_file_urls_are_local_paths(tmp_path):
    from urllib.parse import quote
    folder = tmp_path / "my pictures"
    folder.mkdir()
    path = folder / "red 100%.png"
    Image.new("RGB", (8, 6), (200, 0, 0)).save(path)
    for url in ("file://" + quote(str(path)), "file://localhost" + quote(str(path))):
        assert load_image(url).size == (8, 6)
    with pytest.raises(ImageLoadError, match="another machine"):
        load_image("file://fileserver" + quote(str(path)))
    with pytest.raises(ImageLoadError, match="disabled"):
        load_image("file://" + quote(str(path)), allow_path=False)     # servers: never a local file
    with pytest.raises(ImageLoadError, match="not found"):
        load_image("file://" + quote(str(folder / "missing.png")))


@pytest.fixture
def http_server():
    """A local HTTP server answering 404 to every request: (its base URL)."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404, "Not Found")

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def closed_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]         # nothing listens there once the socket is closed


def test_a_failed_download_is_one_clear_line(http_server, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    cases = {f"http://127.0.0.1:{closed_port()}/a.png": "connection refused",
             f"{http_server}/a.png": "the server answered 404 Not Found"}
    for url, reason in cases.items():
        with pytest.raises(ImageLoadError) as e:
            load_image(url)
        assert str(e.value) == f"Could not download {url}: {reason}.", str(e.value)
    # a host name that does not resolve, without the network: the resolver fails as it would offline
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ImageLoadError) as e:
        load_image("https://images.example.invalid/a.png")
    message = str(e.value)
    assert message.startswith("Could not download https://images.example.invalid/a.png: the host name could "
                              "not be resolved") and "\n" not in message
    assert "Pool" not in message and "Caused by" not in message and "object at" not in message
