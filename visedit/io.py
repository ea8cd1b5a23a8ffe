"""Small I/O helpers shared by every module: image loading with clear errors, atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

#: Images whose longer side exceeds this are downscaled (aspect kept) when loaded.
MAX_IMAGE_SIDE = 4096


def load_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """Return ``image`` (a path, a PIL image or a uint8 array (H, W[, 3|4])) as an RGB PIL image.

    Conversion rule (documented, silent): grayscale (``L``, ``I``, ``F``, ``1``) is replicated to three
    channels; images with transparency (``RGBA``, ``LA``, ``P`` with a transparent colour) are
    composited over a white background; any other mode goes through PIL's ``convert("RGB")``. Images
    whose longer side exceeds :data:`MAX_IMAGE_SIDE` are downscaled to that side first.
    """
    if isinstance(image, Image.Image):
        img = image
    elif type(image).__module__ == "numpy" and getattr(image, "dtype", None) == "uint8" \
            and (image.ndim == 2 or image.ndim == 3 and image.shape[-1] in (3, 4)):
        img = Image.fromarray(image)
    elif not isinstance(image, (str, os.PathLike)):
        raise ValueError(f"image must be a file path, a PIL image, a uint8 array (H, W[, 3|4]) or None, got "
                         f"{type(image).__name__}{getattr(image, 'shape', '')} — e.g. PIL.Image.open(path)")
    else:
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path} — check the path (relative paths are "
                                    f"resolved from {Path.cwd()}; MMEdit files: the image root, "
                                    "--image-root / image_root=)")
        try:
            with Image.open(path) as opened:
                opened.load()
                img = opened.copy()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot read image {path}: {err} — pass a PNG/JPEG file or a PIL image") from err
    if max(img.size) > MAX_IMAGE_SIDE:
        scale = MAX_IMAGE_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "F"):
        img = img.convert("F")
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = img.point(lambda x: (x - lo) * scale).convert("L")
    return img.convert("RGB")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Works for files and directories. On error the temporary is removed and ``path`` is untouched, so
    nothing half-written is ever visible under the final name.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            old = final.with_name(f".{final.name}.old{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            _rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        _rmtree(tmp.parent)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def yaml_error(err: Exception) -> str:
    """One line for a YAML syntax error: the problem and where (``line 2, column 5``)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem}{where}"


def load_yaml(path: str | os.PathLike) -> Any:
    """Parse the YAML file at ``path``; a syntax error is a one-line ``ValueError`` that says where it is."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: pass a YAML file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({yaml_error(err)}): fix the file, e.g. `lr: [1e-3, 1e-4]` "
                         "(lists need their closing bracket)") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
