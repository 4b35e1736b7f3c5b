"""Hostile and ordinary media built in memory for the data tests (hostile files for
tests/test_hostile_data.py and tests/test_chaos.py; webm and m4a for the shard tests): nothing here is
downloaded."""

from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import soundfile
from PIL import Image


def png_of_zeros(width: int, height: int) -> bytes:
    """A real, valid black RGB PNG of any size, built row by row (a few hundred KB for 100M pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + 3 * width)  # filter byte + RGB
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def flac_claiming(total_frames: int) -> bytes:
    """1 s of flac whose STREAMINFO header promises `total_frames` samples."""
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(16_000, np.float32), 16_000, format="FLAC")
    data = bytearray(buf.getvalue())
    word = int.from_bytes(data[18:26], "big")  # 20 bits rate, 3 channels, 5 bits/sample, 36 total
    data[18:26] = ((word & ~((1 << 36) - 1)) | total_frames).to_bytes(8, "big")
    data[26:42] = bytes(16)  # no MD5 to check against
    return bytes(data)


def wav(rate: int, seconds: float = 1.0, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros((round(rate * seconds), channels), np.float32), rate, format="WAV")
    return buf.getvalue()


def tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, format="TIFF")
    return buf.getvalue()


def png(i: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (10 * i, 100, 50)).save(buf, format="PNG")
    return buf.getvalue()


def webm(seconds: float, fps: int = 16, side: int = 48) -> bytes:
    """A VP9 webm without sound whose frames brighten steadily."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm") as box:
        stream = box.add_stream("libvpx-vp9", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), 4 * i, np.uint8), format="rgb24")
            frame.pts = i
            box.mux(stream.encode(frame))
        box.mux(stream.encode(None))
    return buf.getvalue()


def m4a(seconds: float, rate: int = 22_050) -> bytes:
    buf = io.BytesIO()
    wave = (0.3 * np.sin(np.arange(int(seconds * rate)) * 0.05)).astype(np.float32)[None]
    with av.open(buf, mode="w", format="mp4") as box:
        stream = box.add_stream("aac", rate=rate, layout="mono")
        for lo in range(0, wave.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, lo : lo + 1024]), "fltp", "mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, lo, Fraction(1, rate)
            box.mux(stream.encode(frame))
        box.mux(stream.encode(None))
    return buf.getvalue()
