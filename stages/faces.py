"""Face detection (``faces``): how many faces an image shows and how much of it they cover, and
optionally the image with its faces blurred, as DataComp blurred faces in its pool.

Detection is OpenCV's frontal-face Haar cascade, which ships inside the opencv wheel that
img2dataset already installs (Apache-2.0; no download). Images are decoded to grey by
``cv2.imdecode`` (OpenCV's own formats only) at most ``max_side`` pixels on their longer side.

Columns: ``face_count`` (int32), ``face_area`` (float32: summed box area / image area, at most 1),
``face_boxes`` (list of [x, y, w, h] in fractions of the image). Score, then decide: a later
``select``/filter stage (or a query) thresholds them; this stage drops only undecodable images
(``decode_error``) and rows without an image (``no_image``). With ``blur: true`` the stage also
writes the image with every detected face Gaussian-blurred; later stages and the training shards
read that one (the download folder keeps what was fetched).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from pairsift.stages.base import IMAGE, Contract, ScoreSpec, Stage, StageConfig, with_reason

FACE_COUNT, FACE_AREA, FACE_BOXES = "face_count", "face_area", "face_boxes"
NO_IMAGE, DECODE_ERROR = "no_image", "decode_error"


class FacesConfig(StageConfig):
    cascade: str = Field("haarcascade_frontalface_default.xml",
                         description="a cascade file in OpenCV's bundled data folder, or a path to one")
    scale_factor: float = Field(1.1, gt=1.0)
    # On the synthetic web's shapes 4 neighbours found faces in 5.6% of images, 6 in none, with the
    # same recall on drawn faces (tests/stages/test_faces.py).
    min_neighbors: int = Field(6, ge=1, description="higher: fewer false faces, more missed ones")
    min_face_fraction: float = Field(0.05, gt=0, le=1, description="smallest face side, as a share of the shorter side")
    max_side: int = Field(512, ge=64, description="images are shrunk to this longer side before detection")
    blur: bool = Field(False, description="also write the image with its detected faces blurred")
    blur_quality: int = Field(95, ge=1, le=100, description="JPEG quality of a blurred image")


class Faces(Stage):
    name: ClassVar[str] = "faces"
    config_class: ClassVar[type[StageConfig]] = FacesConfig
    stateful: ClassVar[bool] = True  # the cascade loads once per worker
    cfg: FacesConfig

    def __init__(self, cfg: FacesConfig):
        super().__init__(cfg)
        self.detector = None

    def contract(self) -> Contract:
        writes = {FACE_COUNT: pa.int32(), FACE_AREA: pa.float32(), FACE_BOXES: pa.list_(pa.list_(pa.float32()))}
        if self.cfg.blur:
            writes[IMAGE] = pa.binary()
        scores = {FACE_COUNT: ScoreSpec("faces detected per image"),
                  FACE_AREA: ScoreSpec("share of the image covered by faces")}
        return Contract(reads=(IMAGE,), writes=writes, reasons=(NO_IMAGE, DECODE_ERROR), bulky=(FACE_BOXES,),
                        scores=scores)

    def setup(self) -> None:
        import os

        import cv2

        path = self.cfg.cascade if os.path.sep in self.cfg.cascade else cv2.data.haarcascades + self.cfg.cascade
        detector = cv2.CascadeClassifier(path)
        if detector.empty():
            raise ValueError(f"faces: cannot load the cascade {path}")
        self.detector = detector

    def __call__(self, shard: pa.Table) -> pa.Table:
        if self.detector is None:
            self.setup()
        counts, areas, boxes, reasons, images = [], [], [], [], []
        for data in shard.column(IMAGE).to_pylist():
            found = self.detect(data) if data else None
            reasons.append(None if found is not None else (DECODE_ERROR if data else NO_IMAGE))
            found = found if found is not None else []
            counts.append(len(found))
            areas.append(min(1.0, sum(w * h for _, _, w, h in found)))
            boxes.append([list(b) for b in found])
            if self.cfg.blur:
                images.append(blur_faces(data, found, self.cfg.blur_quality) if found else data)
        out = shard.append_column(FACE_COUNT, pa.array(counts, pa.int32()))
        out = out.append_column(FACE_AREA, pa.array(areas, pa.float32()))
        out = out.append_column(FACE_BOXES, pa.array(boxes, pa.list_(pa.list_(pa.float32()))))
        if self.cfg.blur:
            out = out.set_column(out.column_names.index(IMAGE), IMAGE, pa.array(images, pa.binary()))
        return with_reason(out, reasons)

    def detect(self, data: bytes) -> list[tuple[float, float, float, float]] | None:
        """Face boxes as fractions of the image, or None when the bytes do not decode."""
        import cv2

        grey = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        if grey is None or grey.size == 0:
            return None
        height, width = grey.shape
        scale = min(1.0, self.cfg.max_side / max(height, width))
        if scale < 1.0:
            grey = cv2.resize(grey, (max(1, round(width * scale)), max(1, round(height * scale))),
                              interpolation=cv2.INTER_AREA)
        h, w = grey.shape
        side = max(12, round(min(h, w) * self.cfg.min_face_fraction))
        assert self.detector is not None
        found = self.detector.detectMultiScale(grey, scaleFactor=self.cfg.scale_factor,
                                               minNeighbors=self.cfg.min_neighbors, minSize=(side, side))
        return [(x / w, y / h, bw / w, bh / h) for x, y, bw, bh in np.asarray(found).reshape(-1, 4).tolist()]


def blur_faces(data: bytes, boxes: list[tuple[float, float, float, float]], quality: int) -> bytes:
    """The image re-encoded as JPEG with each box blurred past recognition (by a person or a detector)."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    height, width = image.shape[:2]
    for fx, fy, fw, fh in boxes:
        x0, y0 = max(0, int(fx * width)), max(0, int(fy * height))
        x1, y1 = min(width, int(np.ceil((fx + fw) * width))), min(height, int(np.ceil((fy + fh) * height)))
        if x1 <= x0 or y1 <= y0:
            continue
        # A mosaic of 6x6 cells, then smoothed: a Gaussian alone leaves a face a detector still finds.
        region = cv2.resize(image[y0:y1, x0:x1], (6, 6), interpolation=cv2.INTER_AREA)
        region = cv2.resize(region, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        kernel = max(3, (max(x1 - x0, y1 - y0) // 4) | 1)  # odd
        image[y0:y1, x0:x1] = cv2.GaussianBlur(region, (kernel, kernel), 0)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return encoded.tobytes() if ok else data
