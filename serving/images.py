"""Images sent by clients: base64 strings, data: URLs and (only where the operator allows it) http(s)
URLs. Everything is decoded in memory; nothing is written to disk, and no path is ever opened.
"""
import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urljoin, urlsplit

from model.defaults import SERVER_MAX_IMAGE_BYTES, SERVER_MAX_IMAGE_PIXELS
from model.image import ImageLoadError, load_image

from .errors import BadRequestError, PayloadTooLargeError

_B64_JUNK = re.compile(r"\s+")
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")
NO_REMOTE = ("This server does not fetch image URLs; send the image inline as base64 (a data: URL such as "
             "data:image/jpeg;base64,...). The operator can allow http(s) URLs with --allow-remote-images.")


@dataclass
class ImageLimits:
    max_bytes: int = SERVER_MAX_IMAGE_BYTES     # encoded size of one image
    max_pixels: int = SERVER_MAX_IMAGE_PIXELS   # width x height, checked before decoding (decompression bombs)
    allow_remote: bool = False              # fetch http(s) URLs at all
    allow_private_hosts: bool = False       # ... also from loopback / private / link-local addresses
    fetch_timeout: float = 15.0
    max_redirects: int = 3


def decode_base64(data: str, limits: ImageLimits, what: str = "image") -> bytes:
    """Standard or URL-safe base64, with or without padding or line breaks."""
    if not isinstance(data, str):
        raise BadRequestError(f"'{what}' must be a base64 string.")
    data = _B64_JUNK.sub("", data)
    if len(data) * 3 // 4 > limits.max_bytes + 3:
        raise PayloadTooLargeError(f"The {what} is about {len(data) * 3 // 4} bytes, over the limit of "
                                   f"{limits.max_bytes} bytes.")
    if not data or not _B64_CHARS.match(data):
        raise BadRequestError(f"'{what}' is not valid base64.")
    data = data.rstrip("=")
    if len(data) % 4 == 1:
        raise BadRequestError(f"'{what}' is not valid base64 (truncated).")
    data += "=" * (-len(data) % 4)
    try:
        return base64.b64decode(data.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequestError(f"'{what}' is not valid base64 ({e}).") from None


def parse_data_url(url: str, limits: ImageLimits) -> bytes:
    """data:[<media type>][;base64],<data> -> bytes (only base64 data URLs carry images sensibly)."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise BadRequestError("The data: URL has no ',' separating its header from its data.")
    params = head[len("data:"):].split(";")
    if "base64" not in [p.strip().lower() for p in params[1:]]:
        raise BadRequestError("Only base64 data: URLs are supported for images (data:image/png;base64,...).")
    media = params[0].strip().lower()
    if media and not media.startswith("image/") and media != "application/octet-stream":
        raise BadRequestError(f"The data: URL has media type {media!r}, not an image type.")
    return decode_base64(payload, limits, "image_url")


def decode_image(data: bytes, limits: ImageLimits):
    """Bytes -> RGB PIL image, enforcing the byte (413) and pixel (400) limits."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(f"The image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes.")
    try:
        return load_image(data, allow_path=False, allow_url=False, max_bytes=limits.max_bytes,
                          max_pixels=limits.max_pixels)
    except ImageLoadError as e:
        raise BadRequestError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - whatever PIL raises on hostile input is the client's error
        raise BadRequestError(f"The image could not be decoded ({type(e).__name__}: {e}).") from None


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def _check_host(url: str, limits: ImageLimits) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequestError(f"Unsupported image URL {url[:200]!r}: only http(s) and data: URLs.")
    if limits.allow_private_hosts:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as e:
        raise BadRequestError(f"Could not resolve the image URL's host {parts.hostname!r}: {e}") from None
    if not infos or not all(_is_public(info[4][0]) for info in infos):
        raise BadRequestError(f"The image URL's host {parts.hostname!r} is not a public address; this server "
                              f"only fetches images from public hosts.")


async def fetch_image_bytes(url: str, limits: ImageLimits) -> bytes:
    """Download an image over http(s), at most limits.max_bytes, following a few checked redirects."""
    if not limits.allow_remote:
        raise BadRequestError(NO_REMOTE)
    import httpx
    async with httpx.AsyncClient(timeout=limits.fetch_timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(limits.max_redirects + 1):
            await _check_host(url, limits)
            try:
                async with client.stream("GET", url) as r:
                    if r.is_redirect and "location" in r.headers:
                        url = urljoin(url, r.headers["location"])
                        continue
                    if r.status_code != 200:
                        raise BadRequestError(f"Fetching the image URL answered HTTP {r.status_code}.")
                    size = r.headers.get("content-length")
                    if size and size.isdigit() and int(size) > limits.max_bytes:
                        raise PayloadTooLargeError(f"The image at the URL is {size} bytes, over the limit of "
                                                   f"{limits.max_bytes} bytes.")
                    data = bytearray()
                    async for chunk in r.aiter_bytes():
                        data += chunk
                        if len(data) > limits.max_bytes:
                            raise PayloadTooLargeError(f"The image at the URL is over the limit of "
                                                       f"{limits.max_bytes} bytes.")
                    return bytes(data)
            except httpx.HTTPError as e:
                raise BadRequestError(f"Could not fetch the image URL: {type(e).__name__}: {e}") from None
    raise BadRequestError("The image URL redirected too many times.")


@dataclass
class ImageRef:
    """An image as the client gave it: inline bytes, or a URL still to fetch."""
    data: Optional[bytes] = None
    url: Optional[str] = None

    async def load_bytes(self, limits: ImageLimits) -> bytes:
        if self.data is not None:
            return self.data
        return await fetch_image_bytes(self.url, limits)


def image_ref_from_url(url, limits: ImageLimits) -> ImageRef:
    """An OpenAI image_url: data: URLs decode now; http(s) URLs are fetched later (if allowed)."""
    if not isinstance(url, str) or not url.strip():
        raise BadRequestError("image_url.url must be a non-empty string.")
    url = url.strip()
    low = url[:16].lower()
    if low.startswith("data:"):
        return ImageRef(data=parse_data_url(url, limits))
    if low.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise BadRequestError(NO_REMOTE)
        return ImageRef(url=url)
    raise BadRequestError("image_url.url must be a data: URL (data:image/png;base64,...) or an http(s) URL; "
                          "file paths are never opened.")
