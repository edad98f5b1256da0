"""A causal trace as a PNG heat map, written with the standard library alone (zlib + struct).

Why not matplotlib: it is a large dependency for one picture, and memfed's install is kept lean. The
picture has three panels (residual stream, MLP output, attention output, as in the ROME paper), rows =
tokens (subject tokens marked ``*``), columns = layers, darker = larger indirect effect, labelled with a
built-in 3x5 pixel font (upper case; characters it lacks are drawn as blanks).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from memfed.errors import InvalidArgumentError, StorageError
from memfed.node.editing.trace import TraceResult

_GLYPHS = {
    "A": ".#.#.#####.##.#", "B": "##.#.###.#.###.", "C": ".###..#..#...##", "D": "##.#.##.##.###.",
    "E": "####..##.#..###", "F": "####..##.#..#..", "G": ".###..#.##.#.##", "H": "#.##.#####.##.#",
    "I": "###.#..#..#.###", "J": "..#..#..##.#.#.", "K": "#.##.###.#.##.#", "L": "#..#..#..#..###",
    "M": "#.########.##.#", "N": "##.#.##.##.##.#", "O": ".#.#.##.##.#.#.", "P": "##.#.###.#..#..",
    "Q": ".#.#.##.###..##", "R": "##.#.###.#.##.#", "S": ".###...#...###.", "T": "###.#..#..#..#.",
    "U": "#.##.##.##.####", "V": "#.##.##.##.#.#.", "W": "#.##.########.#", "X": "#.##.#.#.#.##.#",
    "Y": "#.##.#.#..#..#.", "Z": "###..#.#.#..###", "0": "####.##.##.####", "1": ".#.##..#..#.###",
    "2": "##...#.#.#..###", "3": "##...#.#...###.", "4": "#.##.####..#..#", "5": "####..##...###.",
    "6": ".###..####.####", "7": "###..#.#..#..#.", "8": "####.#####.####", "9": "####.####..###.",
    ".": ".............#.", ",": "..........#.#..", "?": "##...#.#.....#.", ":": "....#.....#....",
    "*": "...#.#.#.#.#...", "'": ".#..#..........", "-": "......###......",
}  # fmt: skip
_COLOURS = {"hidden": (96, 24, 140), "mlp": (20, 110, 50), "attn": (160, 30, 30)}
_TITLES = {"hidden": "RESIDUAL", "mlp": "MLP", "attn": "ATTN"}
_SCALE = 2  # font pixels per glyph pixel
_CELL_W, _CELL_H = 22, 16


def _glyph(ch: str) -> str:
    g = _GLYPHS.get(ch.upper(), "")
    return g.ljust(15, ".")[:15]


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def rect(self, x: int, y: int, w: int, h: int, rgb: tuple[int, int, int]) -> None:
        for yy in range(max(0, y), min(self.h, y + h)):
            start = (yy * self.w + max(0, x)) * 3
            n = max(0, min(self.w, x + w) - max(0, x))
            self.px[start : start + 3 * n] = bytes(rgb) * n

    def text(self, x: int, y: int, text: str, rgb: tuple[int, int, int] = (0, 0, 0)) -> None:
        for i, ch in enumerate(text):
            g = _glyph(ch)
            for row in range(5):
                for col in range(3):
                    if g[row * 3 + col] == "#":
                        self.rect(x + (i * 4 + col) * _SCALE, y + row * _SCALE, _SCALE, _SCALE, rgb)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[r * self.w * 3 : (r + 1) * self.w * 3]) for r in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def _label(token: str, subject: bool, width: int = 12) -> str:
    text = token.replace("Ġ", " ").replace("\n", " ").strip() or "_"
    return (("*" if subject else " ") + text)[:width]


def render_trace(result: TraceResult) -> bytes:
    """The PNG bytes of ``result``'s heat maps."""
    kinds = [k for k in ("hidden", "mlp", "attn") if k in result.effects]
    if not kinds:
        raise InvalidArgumentError("the trace holds no effects to draw")
    n_tok, n_layer = len(result.tokens), result.num_layers
    label_w = 13 * 4 * _SCALE
    panel_w = n_layer * _CELL_W + 12
    top = 34
    width = label_w + len(kinds) * panel_w + 8
    height = top + n_tok * _CELL_H + 30
    canvas = _Canvas(width, height)
    first, last = result.subject_range
    for t, token in enumerate(result.tokens):
        canvas.text(4, top + t * _CELL_H + 3, _label(token, first <= t <= last))
    for p, kind in enumerate(kinds):
        x0 = label_w + p * panel_w
        canvas.text(x0, 6, _TITLES[kind], _COLOURS[kind])
        effects = result.effects[kind]
        peak = max((v for row in effects for v in row), default=0.0)
        for layer in range(n_layer):
            canvas.text(x0 + layer * _CELL_W + 6, top - 14, str(layer))
            for t in range(n_tok):
                v = max(0.0, effects[layer][t]) / peak if peak > 0 else 0.0
                rgb = tuple(int(255 - (255 - c) * v) for c in _COLOURS[kind])
                canvas.rect(x0 + layer * _CELL_W, top + t * _CELL_H, _CELL_W - 1, _CELL_H - 1, rgb)  # type: ignore[arg-type]
        canvas.text(x0, top + n_tok * _CELL_H + 8, f"MAX {peak:.2f}")
    return canvas.png()


def write_trace_png(result: TraceResult, path: str | Path) -> Path:
    """Write ``render_trace(result)`` to ``path``."""
    out = Path(path)
    try:
        out.write_bytes(render_trace(result))
    except OSError as exc:
        raise StorageError(f"cannot write the heat map to {out}: {exc.strerror or exc}") from exc
    return out
