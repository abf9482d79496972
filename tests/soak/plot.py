"""RSS over time as a PNG, with the standard library only (zlib): one line per process
series, fault starts as grey vertical lines, a legend of coloured swatches. No text
rendering: the legend's order is printed beside the image's path (see `rss_png`)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

W, H, PAD = 960, 420, 30
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _png(pixels: list[bytearray], path: Path) -> None:
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
                     + chunk(b"IEND", b""))


def rss_png(samples: list[tuple[float, dict[str, int]]], path: Path, faults: list[dict] = (),
            names: list[str] | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """Draw `samples` ([(seconds, {series: KiB})]) into `path`; return the legend
    (series name, colour) in drawing order. The y axis starts at 0 MiB."""
    pixels = [bytearray(b"\xff" * (W * 3)) for _ in range(H)]

    def put(x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < W and 0 <= y < H:
            pixels[y][3 * x:3 * x + 3] = bytes(c)

    names = names or sorted({k for _, s in samples for k in s})
    t_max = max((t for t, _ in samples), default=1.0) or 1.0
    v_max = max((v for _, s in samples for k, v in s.items() if k in names), default=1) * 1.1
    sx = lambda t: PAD + int((W - 2 * PAD) * t / t_max)  # noqa: E731
    sy = lambda v: H - PAD - int((H - 2 * PAD) * v / v_max)  # noqa: E731
    # axes, and a faint line every 10 MiB
    for x in range(PAD, W - PAD):
        put(x, H - PAD, (0, 0, 0))
        for mib in range(10, int(v_max / 1024) + 1, 10):
            put(x, sy(mib * 1024), (230, 230, 230))
    for y in range(PAD, H - PAD):
        put(PAD, y, (0, 0, 0))
    for f in faults:
        for y in range(PAD, H - PAD, 2):
            put(sx(f["start"]), y, (170, 170, 170))
    legend = []
    for i, name in enumerate(names):
        c = COLOURS[i % len(COLOURS)]
        legend.append((name, c))
        pts = [(sx(t), sy(s[name])) for t, s in samples if name in s]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            steps = max(abs(x1 - x0), abs(y1 - y0), 1)
            for k in range(steps + 1):
                x = x0 + (x1 - x0) * k // steps
                y = y0 + (y1 - y0) * k // steps
                put(x, y, c)
                put(x, y + 1, c)
        for dx in range(12):  # swatch in the legend row
            for dy in range(8):
                put(PAD + 10 + i * 20 + dx, 8 + dy, c)
    _png(pixels, path)
    return legend
