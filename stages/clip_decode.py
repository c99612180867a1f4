"""Image bytes -> model-ready pixel batches for the ``clip_score`` stage.

Two decoders share one geometry (open_clip's eval preprocess: shorter side to size, bicubic with
antialias, centre crop, normalise):

* ``torchvision`` (the default): plain JPEGs are decoded by ``torchvision.io.decode_jpeg`` — on CUDA in
  batched calls (nvJPEG), so decode never caps the model — then resized, cropped and normalised as
  tensors on the same device. Everything nvJPEG should not see (PNG, WebP, CMYK, 12-bit or truncated
  JPEGs) and anything it fails on is decoded by Pillow instead, never dropped. On CPU the same
  functions run per image in a thread pool: libjpeg + torch's uint8 resize kernel cost about half of
  Pillow decode + Pillow resize and agree with them to one grey level. The batched (GPU) pipeline
  also runs on CPU, which is how it is tested without a GPU.
* ``pil``: Pillow decode + the model's own open_clip preprocess, per image in a thread pool (Pillow
  releases the GIL while decoding and resizing): exactly what open_clip users compute.

Per-image failures are values (``None``), never exceptions: the stage turns them into ``decode_error``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from pairsift.common.images import open_image

if TYPE_CHECKING:
    import torch

# Pillow refuses images above 2x this many pixels (a decompression bomb); nvJPEG gets the same cap
# from the header, before any allocation.
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
# Full-resolution decoded pixels held at once on the device before they are resized away: bounds
# memory when a batch holds a few huge images (1024 x 12 MP would otherwise be ~37 GB).
DECODE_BUDGET_PIXELS = 256 * 1024 * 1024

# SOF markers nvJPEG decodes: baseline, extended sequential, progressive (Huffman). Arithmetic-coded
# and lossless JPEGs go to Pillow.
_GPU_SOF = {0xC0, 0xC1, 0xC2}
_ALL_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class PixelSpec:
    """The geometry and normalisation of a model's eval preprocess (open_clip ``preprocess_cfg``)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_model(cls, model: Any) -> PixelSpec:
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
        mean = (mean,) * 3 if isinstance(mean, (int, float)) else mean
        std = (std,) * 3 if isinstance(std, (int, float)) else std
        return cls(
            size=size,
            mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in std),  # type: ignore[arg-type]
            interpolation=cfg.get("interpolation") or "bicubic",
            resize_mode=cfg.get("resize_mode") or "shortest",
        )

    @property
    def tensor_path_supported(self) -> bool:
        """Geometries the tensor path reproduces exactly; others use the model's PIL preprocess.

        open_clip's "longest" (pad) and non-square "shortest" use other transforms; rare in practice."""
        square = self.size[0] == self.size[1]
        return self.interpolation in ("bicubic", "bilinear", "random") and (
            self.resize_mode == "squash" or (self.resize_mode == "shortest" and square)
        )


# ---------------------------------------------------------------------------------------------- PIL


def pil_preprocess(data: bytes, preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor | None:
    """Decode with Pillow and apply the model's preprocess; None when the bytes are not an image."""
    try:
        with open_image(data) as image:
            return preprocess(image)
    except Exception:  # noqa: BLE001 - any decoder failure is a per-image decode_error
        return None


def pil_rgb(data: bytes) -> Any:
    """Decode with Pillow to an HxWx3 uint8 array (CMYK, palette, alpha -> RGB); None on failure."""
    import numpy as np

    try:
        with open_image(data) as image:
            return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy shares it
    except Exception:  # noqa: BLE001 - any decoder failure is a per-image decode_error
        return None


# ------------------------------------------------------------------------------------- JPEG headers


def jpeg_header(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(sof_marker, bits, height, width, components) of a JPEG's frame header; None if not a JPEG.

    Walks the marker segments (a few dozen bytes of Python) so routing needs no decode."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # standalone markers: no length
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _ALL_SOF:
            if pos + 10 > end or length < 8:
                return None
            precision = data[pos + 4]
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            components = data[pos + 9]
            return marker, precision, height, width, components
        if marker == 0xDA or length < 2:  # scan data before any frame header: malformed
            return None
        pos += 2 + length
    return None


def nvjpeg_friendly(data: bytes) -> int:
    """Pixel count if nvJPEG should decode this image, else 0 (Pillow decodes it instead).

    Refused: non-JPEG, CMYK/YCCK (4 components), 12-bit and arithmetic-coded JPEGs, zero or bomb-sized
    frames, and files without an end-of-image marker (truncated: Pillow reports those as broken)."""
    header = jpeg_header(data)
    if header is None:
        return 0
    marker, bits, height, width, components = header
    if marker not in _GPU_SOF or bits != 8 or components not in (1, 3):
        return 0
    pixels = height * width
    if pixels == 0 or pixels > MAX_PIXELS:
        return 0
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return 0
    return pixels


# ----------------------------------------------------------------------------------- tensor path


def _as_tensor(data: bytes) -> torch.Tensor:
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs with torchvision in one call (nvJPEG's batched decoder on CUDA, libjpeg on CPU);
    None where an image fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [_as_tensor(d) for d in datas]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        # One bad image fails the whole batched call: isolate it, decode the rest one by one.
        out: list[torch.Tensor | None] = []
        for tensor in tensors:
            try:
                out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def plan_chunks(pixel_counts: Sequence[int], budget: int) -> list[list[int]]:
    """Split indices, in order, into chunks whose decoded pixels stay within ``budget`` (an image
    larger than the budget gets a chunk of its own)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, pixels in enumerate(pixel_counts):
        if current and total + pixels > budget:
            chunks.append(current)
            current, total = [], 0
        current.append(index)
        total += pixels
    if current:
        chunks.append(current)
    return chunks


def resize_crop(images: Sequence[torch.Tensor], spec: PixelSpec) -> list[torch.Tensor]:
    """Resize (shorter side, or squash) and centre-crop uint8 CxHxW images to ``spec.size``.

    Uses the same torchvision functions open_clip's preprocess runs on PIL images, so output sizes and
    crop offsets are identical; antialiased bicubic on tensors matches Pillow's filter to ~1 level (on
    CPU torch's uint8 AVX kernel, ~5x faster than Pillow's). On CUDA, same-sized images (common after
    img2dataset's resize) are resized as one batch to save kernel launches; on CPU stacking would only
    add a copy."""
    import torch
    import torchvision.transforms.v2.functional as F

    interpolation = (
        F.InterpolationMode.BILINEAR if spec.interpolation == "bilinear" else F.InterpolationMode.BICUBIC
    )
    target = list(spec.size)

    def resize(batch: torch.Tensor) -> torch.Tensor:
        if spec.resize_mode == "squash":
            return F.resize(batch, target, interpolation=interpolation, antialias=True)
        batch = F.resize(batch, [target[0]], interpolation=interpolation, antialias=True)
        return F.center_crop(batch, target)

    if not images or images[0].device.type != "cuda":
        return [resize(image) for image in images]
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    out: list[torch.Tensor | None] = [None] * len(images)
    for indices in groups.values():
        batch = resize(torch.stack([images[i] for i in indices]))
        for i, resized in zip(indices, batch.unbind(0)):
            out[i] = resized
    return out  # type: ignore[return-value]


def normalize(images: Sequence[torch.Tensor], spec: PixelSpec, device: torch.device) -> torch.Tensor:
    """Stack uint8 CxHxW images into a float BxCxHxW batch: /255, then (x - mean) / std, as ToTensor +
    Normalize do (same operation order, so the PIL and tensor paths agree to float rounding)."""
    import torch

    if not images:
        return torch.empty((0, 3, *spec.size), dtype=torch.float32, device=device)
    batch = torch.stack(list(images)).to(device=device, dtype=torch.float32).div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std)


def pil_tensor(data: bytes, pin: bool = False) -> torch.Tensor | None:
    """Pillow decode (the fallback for what torchvision/nvJPEG does not take) -> 3xHxW uint8 on CPU;
    ``pin``: in page-locked memory, so the copy to the GPU can be asynchronous."""
    import torch

    array = pil_rgb(data)
    if array is None:
        return None
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return tensor.contiguous().pin_memory() if pin else tensor


def _one_image(data: bytes, spec: PixelSpec) -> torch.Tensor | None:
    """CPU, per pool thread: decode (torchvision for plain JPEGs, else Pillow) and resize one image."""
    import torch

    image = decode_jpegs([data], torch.device("cpu"))[0] if nvjpeg_friendly(data) else None
    if image is None:
        image = pil_tensor(data)
    return None if image is None else resize_crop([image], spec)[0]


def tensor_pixels(
    blobs: Sequence[bytes],
    spec: PixelSpec,
    device: torch.device,
    pool: Executor,
    batched: bool | None = None,
) -> tuple[torch.Tensor, list[bool]]:
    """Decode + preprocess a batch on ``device``: (pixels of the decodable images in order, ok flags).

    ``batched`` (default: on CUDA) is the GPU pipeline: nvJPEG-friendly JPEGs are decoded in batched
    calls of at most ``DECODE_BUDGET_PIXELS`` and resized right away; everything else, and every
    nvJPEG failure, is decoded by Pillow in ``pool``. It runs on CPU too (libjpeg), which is how it
    is tested without a GPU. Unbatched (CPU default) does decode + resize per image in ``pool``."""
    if batched is None:
        batched = device.type == "cuda"
    if not batched:
        resized = list(pool.map(lambda data: _one_image(data, spec), blobs))
    else:
        resized = [None] * len(blobs)
        friendly = [(i, pixels) for i, data in enumerate(blobs) if (pixels := nvjpeg_friendly(data))]
        fallback = sorted(set(range(len(blobs))) - {i for i, _ in friendly})
        for chunk in plan_chunks([pixels for _, pixels in friendly], DECODE_BUDGET_PIXELS):
            indices = [friendly[c][0] for c in chunk]
            decoded = decode_jpegs([blobs[i] for i in indices], device)
            good = [(i, image) for i, image in zip(indices, decoded) if image is not None]
            fallback.extend(i for i, image in zip(indices, decoded) if image is None)
            for (i, _), image in zip(good, resize_crop([image for _, image in good], spec)):
                resized[i] = image
        if fallback:
            pin = device.type == "cuda"
            tensors = list(pool.map(lambda data: pil_tensor(data, pin), [blobs[i] for i in fallback]))
            # Copied here, not in the pool: this thread's CUDA stream is the one the resize runs on.
            good = [(i, t.to(device, non_blocking=True)) for i, t in zip(fallback, tensors) if t is not None]
            for (i, _), image in zip(good, resize_crop([t for _, t in good], spec)):
                resized[i] = image
    ok = [image is not None for image in resized]
    return normalize([image for image in resized if image is not None], spec, device), ok


def pil_pixels(
    blobs: Sequence[bytes], preprocess: Callable[[Image.Image], torch.Tensor], spec: PixelSpec, pool: Executor
) -> tuple[torch.Tensor, list[bool]]:
    """The CPU path: Pillow decode + the model's preprocess per image in ``pool``."""
    import torch

    tensors = list(pool.map(lambda data: pil_preprocess(data, preprocess), blobs))
    ok = [t is not None for t in tensors]
    good = [t for t in tensors if t is not None]
    if not good:
        return torch.empty((0, 3, *spec.size), dtype=torch.float32), ok
    return torch.stack(good), ok
