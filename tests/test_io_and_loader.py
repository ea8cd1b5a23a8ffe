"""Bad input: images, MMEdit records (our files and real E-VQA/E-IC files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from visedit.io import MAX_IMAGE_SIDE, load_image
from visedit.world import MalformedRecordError, load_mmedit


def test_missing_image_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found: .*nope.png"):
        load_image(tmp_path / "nope.png")


def test_unreadable_image_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        load_image(bad)


def test_grayscale_is_replicated(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)


def test_rgba_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    img = load_image(rgba)
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == (255, 255, 255) and img.getpixel((0, 0)) == (0, 0, 255)


def test_huge_image_is_downscaled():
    img = load_image(Image.new("RGB", (MAX_IMAGE_SIDE * 2, 100)))
    assert img.size == (MAX_IMAGE_SIDE, 50)


EVQA_RECORD = {  # the shape of a released E-VQA record, COCO-style relative paths
    "src": "What type of cat is this?", "pred": "tabby", "rephrase": "What breed is this cat?",
    "alt": "siamese", "image": "val2014/COCO_val2014_000000000042.jpg",
    "image_rephrase": "val2014_image_rephrase/COCO_val2014_000000000042.png",
    "loc": "nq question: who sang the song 1 2 3 4", "loc_ans": "Feist",
    "m_loc": "train2014/COCO_train2014_000000000009.jpg", "m_loc_q": "What is on the plate?",
    "m_loc_a": ["broccoli"],
}


def test_reads_real_evqa_records_unchanged(tmp_path):
    path = tmp_path / "vqa_eval.json"
    path.write_text(json.dumps([EVQA_RECORD]))
    (rec,) = load_mmedit(path, image_root=tmp_path / "coco")
    assert rec.src == EVQA_RECORD["src"] and rec.alt == "siamese" and rec.m_loc_a == "broccoli"
    assert rec.image == (tmp_path / "coco" / "val2014/COCO_val2014_000000000042.jpg").resolve()
    assert rec.m_loc.name == "COCO_train2014_000000000009.jpg"


@pytest.mark.parametrize("field,value,message", [
    ("alt", None, "record 1: field 'alt' must be a non-empty string"),
    ("src", "", "record 1: field 'src' must be a non-empty string"),
])
def test_malformed_record_names_record_and_field(tmp_path, field, value, message):
    bad = dict(EVQA_RECORD, **{field: value})
    path = tmp_path / "x.json"
    path.write_text(json.dumps([EVQA_RECORD, bad]))
    with pytest.raises(MalformedRecordError, match=message):
        load_mmedit(path)


def test_missing_field_is_named(tmp_path):
    bad = {k: v for k, v in EVQA_RECORD.items() if k != "m_loc_q"}
    path = tmp_path / "x.json"
    path.write_text(json.dumps([bad]))
    with pytest.raises(MalformedRecordError, match="record 0: missing field 'm_loc_q'"):
        load_mmedit(path)


def test_missing_dataset_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="MMEdit file not found"):
        load_mmedit(tmp_path / "none.json")
