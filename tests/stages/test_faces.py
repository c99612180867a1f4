"""faces: recall on drawn faces, silence on the synthetic web's shapes, blurring that hides them."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
from synthetic_faces import draw_face, jpeg

from pairsift.pipeline.synth_draw import SHAPES, TEXTURES, draw_concept
from pairsift.stages import stage_class
from pairsift.stages.faces import Faces, FacesConfig


def table(images: list[bytes | None]) -> pa.Table:
    return pa.table({"uid": [f"{i:032x}" for i in range(len(images))], "image": pa.array(images, pa.binary())})


@pytest.fixture(scope="module")
def stage():
    faces = stage_class("faces")(FacesConfig())
    faces.setup()
    return faces


def test_finds_drawn_faces_at_several_sizes(stage):
    images = [jpeg(draw_face(size, seed)) for seed in range(20) for size in (96, 160, 320, 900)]
    out = stage(table(images))
    recall = sum(c >= 1 for c in out.column("face_count").to_pylist()) / len(images)
    assert recall >= 0.9, recall
    areas = np.array(out.column("face_area").to_pylist())
    assert np.all((areas > 0.05) & (areas <= 1.0))  # the drawn face fills about a third of the image
    for boxes in out.column("face_boxes").to_pylist():
        assert all(0 <= v <= 1 for box in boxes for v in box)


def test_the_synthetic_webs_shapes_have_no_faces(stage):
    rnd = random.Random(0)
    images = [jpeg(draw_concept(rnd, colour, shape, 256, 192, rnd.choice(TEXTURES)))
              for colour in ("red", "blue", "green") for shape in SHAPES for _ in range(3)]
    out = stage(table(images))
    false_faces = sum(c > 0 for c in out.column("face_count").to_pylist())
    assert false_faces <= 0.02 * len(images), false_faces
    assert out.column("reason").null_count == len(images)  # scored, none dropped


def test_missing_and_broken_images_get_reasons(stage):
    out = stage(table([None, b"not an image at all", jpeg(draw_face(160, 1))[:200]]))
    assert out.column("reason").to_pylist() == ["no_image", "decode_error", "decode_error"]
    assert out.column("face_count").to_pylist() == [0, 0, 0]


def test_blur_hides_every_face_it_found():
    blurring = Faces(FacesConfig(blur=True))
    blurring.setup()
    images = [jpeg(draw_face(size, seed)) for seed in range(10) for size in (160, 320)]
    shapes = jpeg(draw_concept(random.Random(1), "red", SHAPES[0], 200, 200, TEXTURES[0]))
    out = blurring(table(images + [shapes]))
    assert set(blurring.contract().writes) >= {"image"}
    written = out.column("image").to_pylist()
    assert written[-1] == shapes  # no face: the bytes are kept as they were
    found = sum(c > 0 for c in out.column("face_count").to_pylist()[:-1])
    assert found >= 18
    for before, after, boxes in zip(images, written, out.column("face_boxes").to_pylist()):
        for box in boxes:  # the features are gone (edge energy inside the box), the rest is untouched
            assert detail(after, box) < 0.25 * detail(before, box)
            assert np.abs(grey(after, outside=box) - grey(before, outside=box)).mean() < 2.0


def grey(data: bytes, outside=None) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE).astype(np.float32)
    if outside is not None:
        h, w = image.shape
        x, y, bw, bh = outside
        image[max(0, int(y * h) - 2):int((y + bh) * h) + 3, max(0, int(x * w) - 2):int((x + bw) * w) + 3] = 0
    return image


def detail(data: bytes, box) -> float:
    """Mean high-pass residual inside ``box`` at the scale of eyes and brows (a twentieth of the
    face): how much of the features is left."""
    import cv2

    image = grey(data)
    h, w = image.shape
    x, y, bw, bh = box
    region = image[int(y * h):int((y + bh) * h), int(x * w):int((x + bw) * w)]
    return float(np.abs(region - cv2.GaussianBlur(region, (0, 0), max(1.0, region.shape[0] / 20))).mean())


def test_a_missing_cascade_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="cannot load the cascade"):
        Faces(FacesConfig(cascade=str(tmp_path / "none.xml"))).setup()
