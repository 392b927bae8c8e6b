"""Reading images from paths, URLs, bytes or PIL objects, and the BLIP-2 eval preprocessing.

Every image read here (API, CLI, web demo, fine-tuning data) is decoded by open_image, which lets Pillow
try only the raster formats in RASTER_FORMATS.

Preprocessing (spec 4.1): RGB -> bicubic resize to the configured square size (no crop, aspect ratio
not kept) -> [0, 1] -> CLIP mean/std normalisation. PIL/numpy only: torchvision cannot be imported
beside the CPU torch build.
"""
import io
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .defaults import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageLoadError(ValueError):
    """The image could not be read: missing file, not an image, truncated, too large, bad URL..."""


# The only formats handed to Pillow: what photos and screenshots use. Without a list Pillow tries every
# plugin it has, and its EPS plugin runs Ghostscript on the bytes, so a client could feed PostScript to gs.
RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
NOT_RASTER = "not a PNG, JPEG, WebP, GIF, BMP or TIFF image"

# Pillow's messages can name the file object ("<_io.BytesIO object at 0x7f...>"): noise to a client
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _signature_of(fp) -> Optional[str]:
    """The accepted format whose signature the data starts with, if any (for the error message)."""
    if isinstance(fp, (str, Path)):
        with open(fp, "rb") as f:
            prefix = f.read(16)
    else:
        fp.seek(0)
        prefix = fp.read(16)
    for fmt in RASTER_FORMATS:
        _, accept = Image.OPEN.get(fmt, (None, None))     # Pillow's registry: (factory, signature check)
        if accept is not None and accept(prefix) is True:
            return "WebP" if fmt == "WEBP" else fmt
    return None


def open_image(fp) -> Image.Image:
    """Image.open limited to RASTER_FORMATS (reads the header only; pixels are decoded on load()).
    Anything else raises UnidentifiedImageError (an OSError) whose message says what is wrong:
    "not a PNG, JPEG, WebP, GIF, BMP or TIFF image" or "a truncated or corrupt PNG image"."""
    try:
        return Image.open(fp, formats=RASTER_FORMATS)
    except UnidentifiedImageError as e:
        name = _signature_of(fp)
        raise UnidentifiedImageError(f"a truncated or corrupt {name} image" if name else NOT_RASTER) from e


def _detail(e: BaseException) -> str:
    text = " ".join(_OBJECT_REPR.sub("", str(e)).split())
    return f" ({text})" if text else ""


def _decode(data: bytes, what: str, max_pixels: int) -> Image.Image:
    try:
        with open_image(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageLoadError(f"{what} is {w}x{h} pixels, over the limit of {max_pixels} pixels.")
            img.load()  # decode now (the first frame of a GIF), so a truncated file fails here and not later
            return img.convert("RGB")
    except ImageLoadError:
        raise
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{what} is not a readable image: it is {e}.") from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{what} is too large: it has more pixels than can be decoded safely.") from e
    except Exception as e:  # noqa: BLE001 - whatever a plugin raises on a damaged file means the same
        raise ImageLoadError(f"{what} could not be decoded: it is truncated or corrupt{_detail(e)}.") from e


def _fetch(url: str, max_bytes: int, timeout: float = 20.0) -> bytes:
    import requests
    try:
        with requests.get(url, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            data = bytearray()
            for chunk in r.iter_content(65536):
                data += chunk
                if len(data) > max_bytes:
                    raise ImageLoadError(f"{url} is larger than {max_bytes} bytes.")
            return bytes(data)
    except requests.RequestException as e:
        raise ImageLoadError(f"Could not download {url}: {_download_failure(e, timeout)}.") from e


def _download_failure(error: BaseException, timeout: float) -> str:
    """Why a download failed, in a few words: requests wraps the reason in two layers of urllib3
    exceptions whose text repeats the URL and object reprs ("HTTPConnectionPool(host=...): Max retries
    exceeded ... (Caused by NewConnectionError(...))"), so the innermost cause is reported instead."""
    import socket

    import requests
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"the server answered {error.response.status_code} {error.response.reason or ''}".rstrip()
    if isinstance(error, requests.Timeout):
        return f"no answer within {timeout:g} s"
    root, seen = error, set()
    while id(root) not in seen:       # requests -> urllib3 MaxRetryError -> NewConnectionError -> OSError
        seen.add(id(root))
        reason = getattr(root, "reason", None)
        inner = reason if isinstance(reason, BaseException) else \
            root.args[0] if root.args and isinstance(root.args[0], BaseException) else root.__cause__
        if inner is None:
            break
        root = inner
    if isinstance(root, socket.gaierror):
        return "the host name could not be resolved (no network, or a mistyped address)"
    if isinstance(root, OSError) and root.strerror:
        return root.strerror[:1].lower() + root.strerror[1:]
    text = " ".join(_OBJECT_REPR.sub("", str(root)).split()) or type(root).__name__
    return text.split(" (Caused by")[0]


def _file_url_path(url: str) -> Path:
    """file:///home/me/a%20b.png (what file managers put on the clipboard) -> /home/me/a b.png."""
    from urllib.parse import urlsplit
    from urllib.request import url2pathname
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageLoadError(f"{url} names a file on another machine ({parts.netloc}); give a local path.")
    return Path(url2pathname(parts.path))   # (url2pathname undoes the %-escapes)


def load_image(source, *, allow_path: bool = True, allow_url: bool = True,
               max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a local path, an http(s) URL, raw bytes or a PIL image.
    Servers pass allow_path=False / allow_url=False for anything that came from a user."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ImageLoadError(f"The image is {len(data)} bytes, over the limit of {max_bytes} bytes.")
        return _decode(data, "The image", max_pixels)
    if isinstance(source, (str, Path)):
        text = str(source).strip()
        if text.startswith(("http://", "https://")):
            if not allow_url:
                raise ImageLoadError("Fetching images from URLs is disabled here.")
            return _decode(_fetch(text, max_bytes), text, max_pixels)
        if not allow_path:
            raise ImageLoadError("Reading images from local paths is disabled here.")
        path = _file_url_path(text) if text.lower().startswith("file:") else Path(text).expanduser()
        if not path.is_file():
            raise ImageLoadError(f"Image file not found: {path}")
        if path.stat().st_size > max_bytes:
            raise ImageLoadError(f"{path} is larger than {max_bytes} bytes.")
        return _decode(path.read_bytes(), str(path), max_pixels)
    raise ImageLoadError(f"Unsupported image source of type {type(source).__name__}.")


def pixels_uint8(img: Image.Image, size) -> torch.Tensor:
    """PIL image -> resized RGB bytes [3, H, W] (uint8): a quarter of the float tensor's size, which
    is what training loaders pass between processes (see normalize)."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    img = img.convert("RGB").resize((w, h), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> the model's normalised float32 input (CLIP mean and std)."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=pixels.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=pixels.device)[:, None, None]
    return (pixels.float() / 255.0 - mean) / std


def preprocess(img: Image.Image, size) -> torch.Tensor:
    """PIL image -> normalised tensor [1, 3, H, W] (float32)."""
    return normalize(pixels_uint8(img, size))[None]
