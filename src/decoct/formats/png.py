"""The PNG files of a distilled-set artifact: encode, read the header, decode (no other job).

Images are stored palette-indexed at 1/2/4/8 bits per pixel (palette sets; exactly the image's K
colours) or as 8-bit RGB/L. Decoding compares each PNG's own header with what the manifest says
before Pillow decodes anything, and raises :class:`~decoct.formats.errors.ArtifactError` naming
the file.
"""

from __future__ import annotations

import struct
import warnings
from io import BytesIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from decoct.data.types import DatasetInfo
from decoct.formats.errors import ArtifactError

__all__ = ["PNG_MAGIC", "bits_for", "decode_png", "encode_png", "gather_palette", "png_depth_for_palette",
           "png_header", "png_layout"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def gather_palette(indices: Tensor, palettes: Tensor) -> Tensor:
    """palettes (N,K,C) looked up at indices (N,H,W) -> images (N,C,H,W)."""
    n = torch.arange(indices.shape[0]).view(-1, 1, 1)
    return palettes[n, indices.long()].permute(0, 3, 1, 2).contiguous()


def bits_for(k: int) -> int:
    """ceil(log2 k), at least 1: bits needed to index k distinct values."""
    return max(1, (k - 1).bit_length())


def png_depth_for_palette(k: int) -> int:
    """PNG palette images exist at 1, 2, 4 or 8 bits per pixel."""
    return 1 if k <= 2 else 2 if k <= 4 else 4 if k <= 16 else 8


def png_layout(data: bytes) -> tuple[int, int, int]:
    """(bit depth, colour type, number of PLTE entries) read from a PNG's header chunks."""
    if data[:8] != PNG_MAGIC:
        raise ValueError("not a PNG")
    pos, depth, colour, plte = 8, -1, -1, 0
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IHDR":
            depth, colour = data[pos + 16], data[pos + 17]
        elif kind == b"PLTE":
            plte = length // 3
        elif kind == b"IDAT":
            break
        pos += 12 + length
    return depth, colour, plte


def encode_png(
    image: Tensor, indices: Tensor | None = None, palette: Tensor | None = None
) -> bytes:
    """One image as PNG bytes: palette-indexed when ``palette`` is given, else 8-bit RGB/L.

    Palette PNGs carry exactly the image's K colours and the smallest bit depth PNG allows
    (Pillow picks 1/2/4/8 bits from the PLTE size; ``bits=`` caps it). The written header is
    checked so a Pillow that pads the palette or widens the depth fails loudly instead of
    silently inflating the reported storage.
    """
    buf = BytesIO()
    if palette is not None and indices is not None:
        k, c = palette.shape
        h, w = indices.shape
        rgb = palette.numpy() if c == 3 else palette.numpy().repeat(3, axis=1)
        im = Image.frombytes("P", (w, h), indices.numpy().tobytes())
        im.putpalette(rgb.tobytes(), rawmode="RGB")
        im.save(buf, format="PNG", optimize=True, bits=bits_for(k))
        data = buf.getvalue()
        depth, colour, entries = png_layout(data)
        if (depth, colour, entries) != (png_depth_for_palette(k), 3, k):
            raise RuntimeError(
                f"Pillow wrote a palette PNG with bit depth {depth}, colour type {colour} and "
                f"{entries} palette entries; expected depth {png_depth_for_palette(k)} with {k} "
                "entries. This Pillow version is not supported for palette storage."
            )
        return data
    hwc = image.permute(1, 2, 0).numpy()
    im = Image.fromarray(np.ascontiguousarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc))
    im.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def png_header(data: bytes, rel: str) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR, read without decoding."""
    if len(data) < 33 or data[:8] != PNG_MAGIC:
        raise ArtifactError(f"{rel}: not a PNG file (no PNG signature and header)")
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise ArtifactError(f"{rel}: PNG does not start with its IHDR header — the file is corrupted")
    w, h, depth, colour = struct.unpack(">IIBB", data[16:26])
    return w, h, depth, colour


def decode_png(
    data: bytes, rel: str, info: DatasetInfo, palette_mode: bool, palette_size: int | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """PNG bytes -> (pixels (C,H,W), palette indices (H,W) or None, palette (K,C) or None).

    The PNG header (size, bit depth, colour type) is compared with what the manifest says
    before Pillow decodes anything, so a 13000x13000 image in an 8x8 set costs nothing; Pillow's
    decompression-bomb warning is turned into an error as a second guard.
    """
    w, h, depth, colour = png_header(data, rel)
    if (w, h) != (info.width, info.height):
        raise ArtifactError(
            f"{rel}: PNG header says {w}x{h} (WxH), dataset {info.name!r} in manifest.json is "
            f"{info.width}x{info.height}; not decoded"
        )
    c = info.channels
    if palette_mode:
        want = (png_depth_for_palette(palette_size) if palette_size is not None else depth, 3)
        kind = f"a {palette_size}-colour palette PNG"
    else:
        want = (8, 2 if c == 3 else 0)
        kind = "an 8-bit RGB PNG" if c == 3 else "an 8-bit greyscale PNG"
    if (depth, colour) != want:
        raise ArtifactError(
            f"{rel}: PNG header has bit depth {depth} and colour type {colour}, the manifest's "
            f"storage needs {kind} (depth {want[0]}, colour type {want[1]}); not decoded"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data)) as im:
                fmt, mode, size = im.format, im.mode, im.size
                if size != (info.width, info.height):  # Pillow's reading of the header, before load
                    raise ValueError(f"Pillow reads the size as {size}")
                im.load()
                arr = np.array(im)
                pal = im.getpalette() if mode == "P" else None
    except Exception as e:  # Pillow raises many types for damaged files
        raise ArtifactError(
            f"{rel}: cannot be decoded as a PNG ({e}) — the file is corrupted"
        ) from e
    if fmt != "PNG":
        raise ArtifactError(f"{rel}: is a {fmt} file, expected PNG")
    if palette_mode:
        if mode != "P" or not pal:
            raise ArtifactError(f"{rel}: PNG mode is {mode!r}, a palette set needs mode 'P'")
        # numpy, not torch: per-image torch indexing costs milliseconds of dispatch overhead
        palette = np.asarray(pal, dtype=np.uint8).reshape(-1, 3)[:, :c]
        if palette_size is not None and palette.shape[0] != palette_size:
            raise ArtifactError(
                f"{rel}: palette has {palette.shape[0]} colours, manifest.json says {palette_size}"
            )
        indices = arr.astype(np.uint8)
        if int(indices.max()) >= palette.shape[0]:
            raise ArtifactError(f"{rel}: pixel index {int(indices.max())} is outside its palette")
        pixels = np.ascontiguousarray(palette[indices].transpose(2, 0, 1))
        return (
            torch.from_numpy(pixels),
            torch.from_numpy(indices),
            torch.from_numpy(np.ascontiguousarray(palette)),
        )
    want_mode = "RGB" if c == 3 else "L"
    if mode != want_mode:
        raise ArtifactError(f"{rel}: PNG mode is {mode!r}, expected {want_mode!r} for {c} channel(s)")
    hwc = arr.reshape(info.height, info.width, c)
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1).contiguous(), None, None
