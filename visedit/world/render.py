"""Renderer: entity → RGB image with the object's pixel mask and bounding box.

The object is drawn at a random position, scale and rotation on a cluttered background (a colour
gradient, muted rectangles and lines), with colour jitter and Gaussian pixel noise. The returned mask
is the ground truth later used to score region selection.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from .entities import COLOURS, Entity

_SUPERSAMPLE = 4


def _circle(r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]


def _outline(shape: str) -> list[tuple[list[tuple[float, float]], int]]:
    """Unit-size drawing of ``shape`` (radius ≈ 1): polygons drawn in order, each filled (255) or cut
    out (0) — rings and moons are a disc with a hole."""
    if shape == "ring":
        return [(_circle(1.0), 255), (_circle(0.5), 0)]
    if shape == "moon":
        return [(_circle(1.0), 255), (_circle(0.85, 0.55, -0.1), 0)]
    return [(_polygon(shape), 255)]


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Unit-size outline of a plain ``shape`` (radius ≈ 1) as a list of (x, y) vertices."""
    if shape == "circle":
        return _circle()
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, b = 0.9, 0.32
        return [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                (-a, -b), (-b, -b)]
    if shape == "arrow":
        return [(-0.9, -0.3), (0.1, -0.3), (0.1, -0.8), (0.95, 0), (0.1, 0.8), (0.1, 0.3), (-0.9, 0.3)]
    raise ValueError(f"unknown shape {shape!r}")


@dataclasses.dataclass(frozen=True)
class Rendering:
    """One drawing of an entity.

    ``image``: RGB PIL image (H×W); ``mask``: bool array (H, W), True on the object;
    ``box``: (x0, y0, x1, y1) pixel box of the mask, x1/y1 exclusive.
    """

    image: Image.Image
    mask: np.ndarray
    box: tuple[int, int, int, int]

    @property
    def coverage(self) -> float:
        """Share of the image covered by the object."""
        return float(self.mask.mean())


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(95, 165) + rng.uniform(-22, 22, size=3)
    tilt = rng.uniform(-40, 40, size=3)
    ramp = np.linspace(-0.5, 0.5, size)
    angle = rng.uniform(0, 2 * math.pi)
    grad = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
    img = base[None, None, :] + grad[:, :, None] * tilt[None, None, :]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 9))):  # muted clutter: low-saturation rectangles and lines
        grey = rng.uniform(60, 200)
        col = tuple(int(np.clip(grey + rng.uniform(-25, 25), 0, 255)) for _ in range(3))
        x0, y0 = rng.uniform(-8, size, size=2)
        w, h = rng.uniform(4, size / 3, size=2)
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            draw.line([x0, y0, x0 + w * 2, y0 + h * 2 - size / 3], fill=col, width=int(rng.integers(1, 3)))
    return np.asarray(canvas, dtype=np.float32)


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """1 where the pattern is light, 0 where it is dark, in object coordinates (u, v)."""
    if pattern == "solid":
        return np.ones_like(u)
    if pattern == "striped":
        return (np.floor(u / (period / 2)) % 2 == 0).astype(np.float32)
    if pattern == "checkered":
        return ((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 0).astype(np.float32)
    if pattern == "dotted":
        cu = (u / period) - np.round(u / period)
        cv = (v / period) - np.round(v / period)
        return (np.hypot(cu, cv) > 0.28).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}")


def _paint(img: np.ndarray, entity: Entity, cx: float, cy: float, radius: float, theta: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``entity`` centred at (cx, cy) over ``img`` (H, W, 3 float); returns the new image and the
    object's coverage alpha (H, W) in [0, 1]. Draws the colour jitter from ``rng``."""
    size = img.shape[0]
    c, s = math.cos(theta), math.sin(theta)
    big = size * _SUPERSAMPLE
    mask_img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask_img)
    for poly, fill in _outline(entity.shape):
        pts = [((x * c - y * s) * radius + cx, (x * s + y * c) * radius + cy) for x, y in poly]
        draw.polygon([(x * _SUPERSAMPLE, y * _SUPERSAMPLE) for x, y in pts], fill=fill)
    alpha = np.asarray(mask_img.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
    # pattern in object coordinates (rotates with the object)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    light = _pattern(entity.pattern, u, v, period=max(4.0, radius * 0.55))
    colour = np.asarray(COLOURS[entity.colour], dtype=np.float32) + rng.uniform(-18, 18, size=3)
    dark = colour * 0.35
    fill = light[:, :, None] * colour + (1 - light[:, :, None]) * dark
    return alpha[:, :, None] * fill + (1 - alpha[:, :, None]) * img, alpha


def render(entity: Entity, *, seed: int | np.random.Generator, size: int = 64,
           noise: float = 6.0) -> Rendering:
    """Draw ``entity`` on a cluttered background.

    Position, scale (object radius 23–29% of the image side), rotation, colour jitter, background
    and pixel noise (std ``noise`` in 0–255 units) all come from ``seed``. Same seed → same bytes.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    img = _background(rng, size)
    radius = rng.uniform(0.23, 0.29) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    theta = rng.uniform(0, 2 * math.pi) if entity.shape not in ("circle", "ring") else 0.0
    img, alpha = _paint(img, entity, cx, cy, radius, theta, rng)
    img = img + rng.normal(0, noise, size=img.shape)
    image = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")
    mask = alpha >= 0.5
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Rendering(image=image, mask=mask, box=box)
