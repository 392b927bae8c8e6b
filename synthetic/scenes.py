"""Synthetic scenes: a coloured background with 1 to 3 coloured shapes on a 3x3 grid.

Rasterisation is done here with numpy (4x4 supersampling, integer blending) rather than with
PIL.ImageDraw, so that the pixels depend only on this code and not on the Pillow version; PIL is
used only to wrap the array and to write PNG files.

Geometry: the image is IMAGE_SIZE (224) px square, split into 3x3 cells of 74.67 px. A shape's
"radius" is 20 to 29 px (a 40 to 58 px shape, 3 to 4 patches of a 14-px ViT) and its centre is
jittered by at most 6 px from its cell centre, so every shape stays inside its own cell: shapes
never overlap and the image corners are always background.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

IMAGE_SIZE = 224
SUPERSAMPLE = 4

# Colour names are canonical English identifiers used everywhere (answers, grading, JSON).
BACKGROUND_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "yellow": (250, 210, 0),
    "light blue": (150, 200, 250),
    "pink": (250, 170, 200),
}

SHAPE_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (250, 210, 0),
    "purple": (140, 60, 190),
    "orange": (250, 130, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

# Every colour name that may appear, with its RGB value (names shared by both lists agree).
ALL_COLOURS: Dict[str, Tuple[int, int, int]] = {**SHAPE_COLOURS, **BACKGROUND_COLOURS}

SHAPE_KINDS: Tuple[str, ...] = ("circle", "square", "triangle", "star")

# Reading order: row by row from the top-left.
CELLS: Tuple[str, ...] = (
    "top-left", "top", "top-right",
    "left", "centre", "right",
    "bottom-left", "bottom", "bottom-right",
)

MIN_RADIUS = 20
MAX_RADIUS = 29
MAX_JITTER = 6

_CELL_SIZE = IMAGE_SIZE / 3.0


def cell_centre(cell: str) -> Tuple[float, float]:
    """Pixel coordinates (x, y) of the centre of a grid cell."""
    index = CELLS.index(cell)
    row, col = divmod(index, 3)
    return ((col + 0.5) * _CELL_SIZE, (row + 0.5) * _CELL_SIZE)


def cell_box(cell: str) -> Tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a grid cell in pixels."""
    index = CELLS.index(cell)
    row, col = divmod(index, 3)
    return (col * _CELL_SIZE, row * _CELL_SIZE, (col + 1) * _CELL_SIZE, (row + 1) * _CELL_SIZE)


def _star_vertices(radius: float) -> List[Tuple[float, float]]:
    inner = 0.5 * radius
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((r * math.cos(angle), r * math.sin(angle)))
    return points


def _triangle_vertices(radius: float) -> List[Tuple[float, float]]:
    return [(0.0, -radius), (0.95 * radius, 0.75 * radius), (-0.95 * radius, 0.75 * radius)]


def _inside_polygon(px: np.ndarray, py: np.ndarray, vertices: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over sample points."""
    inside = np.zeros(np.broadcast(px, py).shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x1, y1 = vertices[i]
        x2, y2 = vertices[(i + 1) % n]
        if y1 == y2:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (y1 > py) != (y2 > py)
        x_at = x1 + (py - y1) * ((x2 - x1) / (y2 - y1))
        inside ^= crosses & (px < x_at)
    return inside


@dataclass(frozen=True)
class Shape:
    kind: str            # one of SHAPE_KINDS
    colour: str          # one of SHAPE_COLOURS
    cell: str            # one of CELLS
    radius: int = 24     # half-extent in pixels
    dx: int = 0          # jitter of the centre from the cell centre, pixels
    dy: int = 0

    @property
    def centre(self) -> Tuple[float, float]:
        cx, cy = cell_centre(self.cell)
        return (cx + self.dx, cy + self.dy)

    def bbox(self) -> Tuple[int, int, int, int]:
        """Integer pixel box (x0, y0, x1, y1), end exclusive, holding every covered pixel."""
        cx, cy = self.centre
        r = self.radius
        x0 = max(0, int(math.floor(cx - r)) - 1)
        y0 = max(0, int(math.floor(cy - r)) - 1)
        x1 = min(IMAGE_SIZE, int(math.ceil(cx + r)) + 1)
        y1 = min(IMAGE_SIZE, int(math.ceil(cy + r)) + 1)
        return (x0, y0, x1, y1)

    def contains(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Whether points (in pixel coordinates, arrays) lie inside the shape."""
        cx, cy = self.centre
        x = px - cx
        y = py - cy
        r = float(self.radius)
        if self.kind == "circle":
            return x * x + y * y <= r * r
        if self.kind == "square":
            half = 0.82 * r
            return (np.abs(x) <= half) & (np.abs(y) <= half)
        if self.kind == "triangle":
            return _inside_polygon(x, y, _triangle_vertices(r))
        if self.kind == "star":
            return _inside_polygon(x, y, _star_vertices(r))
        raise ValueError(f"unknown shape kind {self.kind!r}")

    def coverage(self) -> Tuple[Tuple[int, int, int, int], np.ndarray]:
        """(bbox, counts): how many of the SUPERSAMPLE**2 samples of each bbox pixel are inside."""
        x0, y0, x1, y1 = self.bbox()
        s = SUPERSAMPLE
        xs = x0 + (np.arange((x1 - x0) * s, dtype=np.float64) + 0.5) / s
        ys = y0 + (np.arange((y1 - y0) * s, dtype=np.float64) + 0.5) / s
        inside = self.contains(xs[None, :], ys[:, None])
        counts = inside.reshape(y1 - y0, s, x1 - x0, s).sum(axis=(1, 3))
        return (x0, y0, x1, y1), counts.astype(np.int64)

    def mask(self) -> np.ndarray:
        """Boolean IMAGE_SIZE x IMAGE_SIZE array of the pixels the shape touches at all."""
        full = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        (x0, y0, x1, y1), counts = self.coverage()
        full[y0:y1, x0:x1] = counts > 0
        return full

    def to_dict(self) -> dict:
        return {"kind": self.kind, "colour": self.colour, "cell": self.cell,
                "radius": self.radius, "dx": self.dx, "dy": self.dy}

    @classmethod
    def from_dict(cls, d: dict) -> "Shape":
        return cls(kind=d["kind"], colour=d["colour"], cell=d["cell"],
                   radius=int(d.get("radius", 24)), dx=int(d.get("dx", 0)), dy=int(d.get("dy", 0)))


@dataclass(frozen=True)
class Scene:
    background: str                      # one of BACKGROUND_COLOURS
    shapes: Tuple[Shape, ...] = field(default_factory=tuple)

    def __post_init__(self):
        object.__setattr__(self, "shapes", tuple(self.shapes))
        self.validate()

    def validate(self) -> None:
        if self.background not in BACKGROUND_COLOURS:
            raise ValueError(f"unknown background {self.background!r}")
        if not 1 <= len(self.shapes) <= 3:
            raise ValueError("a scene holds 1 to 3 shapes")
        cells = [s.cell for s in self.shapes]
        if len(set(cells)) != len(cells):
            raise ValueError("two shapes share a cell")
        pairs = [(s.colour, s.kind) for s in self.shapes]
        if len(set(pairs)) != len(pairs):
            raise ValueError("two shapes share (colour, kind)")
        for s in self.shapes:
            if s.kind not in SHAPE_KINDS or s.colour not in SHAPE_COLOURS or s.cell not in CELLS:
                raise ValueError(f"bad shape {s}")
            if s.colour == self.background:
                raise ValueError("a shape has the background colour")

    @property
    def ordered_shapes(self) -> List[Shape]:
        """Shapes in reading order of their cells."""
        return sorted(self.shapes, key=lambda s: CELLS.index(s.cell))

    def kind_count(self, kind: str) -> int:
        return sum(1 for s in self.shapes if s.kind == kind)

    def colour_count(self, colour: str) -> int:
        return sum(1 for s in self.shapes if s.colour == colour)

    def has(self, colour: str, kind: str) -> bool:
        return any(s.colour == colour and s.kind == kind for s in self.shapes)

    def render_array(self) -> np.ndarray:
        """uint8 array (IMAGE_SIZE, IMAGE_SIZE, 3)."""
        total = SUPERSAMPLE * SUPERSAMPLE
        canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int64)
        canvas[:, :] = BACKGROUND_COLOURS[self.background]
        for shape in self.shapes:
            (x0, y0, x1, y1), counts = shape.coverage()
            fg = np.array(SHAPE_COLOURS[shape.colour], dtype=np.int64)
            region = canvas[y0:y1, x0:x1]
            k = counts[:, :, None]
            canvas[y0:y1, x0:x1] = (region * (total - k) + fg * k + total // 2) // total
        return canvas.astype(np.uint8)

    def render(self) -> Image.Image:
        return Image.fromarray(self.render_array(), mode="RGB")

    def to_dict(self) -> dict:
        return {"background": self.background, "shapes": [s.to_dict() for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(background=d["background"], shapes=tuple(Shape.from_dict(s) for s in d["shapes"]))


def sample_scene(rng: random.Random, background: Optional[str] = None,
                 n_shapes: Optional[int] = None) -> Scene:
    """Draw a random scene. `background` / `n_shapes` pin those choices when given."""
    if background is None:
        background = rng.choice(list(BACKGROUND_COLOURS))
    if n_shapes is None:
        n_shapes = rng.randint(1, 3)
    cells = rng.sample(list(CELLS), n_shapes)
    colours = [c for c in SHAPE_COLOURS if c != background]
    used = set()
    shapes = []
    for cell in cells:
        while True:
            pair = (rng.choice(colours), rng.choice(SHAPE_KINDS))
            if pair not in used:
                break
        used.add(pair)
        shapes.append(Shape(kind=pair[1], colour=pair[0], cell=cell,
                            radius=rng.randint(MIN_RADIUS, MAX_RADIUS),
                            dx=rng.randint(-MAX_JITTER, MAX_JITTER),
                            dy=rng.randint(-MAX_JITTER, MAX_JITTER)))
    return Scene(background=background, shapes=tuple(shapes))


def save_png(image: Image.Image, path) -> None:
    """Write a PNG deterministically (no metadata, optimised compression)."""
    image.save(path, format="PNG", optimize=True)
