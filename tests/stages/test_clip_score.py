"""clip_score / clip_filter: scores equal plain open_clip, both decoders agree, bad input is a value,
checkpoints load safely or fail in one line, and DataComp's filtering semantics hold over many shards."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from pydantic import ValidationError

from pairsift.common.clip_models import load_clip
from pairsift.stages import clip_decode, stage_class
from pairsift.stages.clip_score import (
    BELOW_THRESHOLD,
    DECODE_ERROR,
    NO_IMAGE,
    NO_SCORE,
    ClipFilter,
    ClipFilterConfig,
    ClipScore,
    ClipScoreConfig,
    pool_threshold,
)

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

# torchvision 0.29 deprecates its decoders in favour of torchcodec; they still are what nvJPEG runs on.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "models" / "tiny-vit.json"
CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ fixtures


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A drawn scene (background gradient + shapes), so resizing has real edges to get right."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    mix = ((xx / width + yy / height) / 2)[..., None]
    image = Image.fromarray((c0 * (1 - mix) + c1 * mix).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(3, width // 2 + 4)), int(rng.integers(3, height // 2 + 4))
        color = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=color)
    return image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """Every kind of input the stage meets: JPEG variants, PNG (alpha, palette), WebP, odd sizes."""
    return {
        "jpeg_landscape": encode(picture(400, 300, 1), "JPEG", quality=90),
        "jpeg_portrait": encode(picture(300, 400, 2), "JPEG", quality=90),
        "jpeg_tiny_upscaled": encode(picture(20, 28, 3), "JPEG", quality=95),
        "jpeg_thin": encode(picture(33, 500, 4), "JPEG"),
        "jpeg_progressive": encode(picture(257, 255, 5), "JPEG", progressive=True),
        "jpeg_gray": encode(picture(200, 150, 6).convert("L"), "JPEG"),
        "jpeg_cmyk": encode(picture(200, 150, 7).convert("CMYK"), "JPEG"),
        "png_rgb": encode(picture(120, 90, 8), "PNG"),
        "png_rgba": encode(picture(90, 120, 9).convert("RGBA"), "PNG"),
        "webp": encode(picture(160, 100, 10), "WEBP", quality=90),
    }


CAPTIONS = [
    "a red circle on a blue background",
    "a tall building",
    "a small dog",
    "stripes",
    "an abstract painting with shapes",
    "a black and white photo",
    "a printed poster",
    "a screenshot",
    "a transparent logo",
    "a landscape at dusk",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A plain open_clip model (seeded random init), its preprocess/tokenizer, and its weights on disk."""
    from safetensors.torch import save_file

    open_clip.add_model_config(TINY)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-vit")
    model.eval()
    weights = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return model, preprocess, open_clip.get_tokenizer("tiny-vit"), weights


def reference_scores(reference, blobs: list[bytes], captions: list[str]) -> np.ndarray:
    """The computation a user writes with open_clip: PIL open -> preprocess -> encode -> normalise -> cos."""
    model, preprocess, tokenizer, _ = reference
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in blobs])
    with torch.no_grad():
        image = model.encode_image(pixels)
        text = model.encode_text(tokenizer(captions))
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (image * text).sum(-1).numpy()


def shard(blobs: list[bytes | None], captions: list[str | None] | None = None) -> pa.Table:
    captions = captions if captions is not None else [f"caption {i}" for i in range(len(blobs))]
    return pa.table(
        {
            "uid": [f"{i:032x}" for i in range(len(blobs))],
            "caption": pa.array(captions, pa.string()),
            "image": pa.array(blobs, pa.binary()),
        }
    )


def scorer_stage(model: str | Path = TINY, **cfg) -> ClipScore:
    cfg.setdefault("device", "cpu")
    stage = ClipScore(ClipScoreConfig(model=str(model), **cfg))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def pil_stage(reference) -> ClipScore:
    """Pillow + the model's own open_clip preprocess: the reference-exact decoder."""
    return scorer_stage(pretrained=str(reference[3]), batch_size=4, decoder="pil")


@pytest.fixture(scope="module")
def auto_stage(reference) -> ClipScore:
    """The default decoder (the tensor path: torchvision/libjpeg + torch resize on CPU)."""
    return scorer_stage(pretrained=str(reference[3]), batch_size=3)


# ------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("which", ["pil_stage", "auto_stage"])
def test_scores_equal_plain_open_clip_reference(reference, images, which, request):
    stage = request.getfixturevalue(which)
    blobs = list(images.values())
    out = stage(shard(blobs, CAPTIONS))
    scores = out.column("clip_score")
    assert scores.type == pa.float32()
    assert out.column("reason").null_count == len(blobs)  # every format decodes: nothing dropped
    expected = reference_scores(reference, blobs, CAPTIONS)
    got = scores.to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert np.all((got >= -1) & (got <= 1))
    assert np.ptp(got) > 1e-3  # the pairs really differ: the comparison is not between constants
    assert out.column("uid").to_pylist() == shard(blobs).column("uid").to_pylist()  # same rows, same order


def test_tensor_path_matches_pil_path_on_cpu(reference, images, pil_stage, auto_stage):
    """The GPU pipeline's functions (batched decode_jpeg calls, tensor resize/crop/normalise, Pillow
    fallback for PNG/WebP/CMYK) run here on CPU and agree with open_clip's PIL preprocess."""
    blobs = list(images.values())
    assert auto_stage.scorer.decoder == "torchvision"
    tensor_scores = auto_stage(shard(blobs, CAPTIONS)).column("clip_score").to_numpy()
    pil_scores = pil_stage(shard(blobs, CAPTIONS)).column("clip_score").to_numpy()
    np.testing.assert_allclose(tensor_scores, pil_scores, atol=1e-4)

    spec = pil_stage.scorer.spec
    cpu = torch.device("cpu")
    with ThreadPoolExecutor(2) as pool:
        from_pil, ok_pil = clip_decode.pil_pixels(blobs, reference[1], spec, pool)
        per_image, ok_one = clip_decode.tensor_pixels(blobs, spec, cpu, pool, batched=False)
        gpu_pipeline, ok_batched = clip_decode.tensor_pixels(blobs, spec, cpu, pool, batched=True)
    assert ok_pil == ok_one == ok_batched == [True] * len(blobs)
    assert torch.equal(per_image, gpu_pipeline)  # one geometry, whichever way it is scheduled
    diff = (from_pil - gpu_pipeline).abs()
    one_level = 1 / 255 / min(spec.std)
    assert diff.max().item() <= 2 * one_level + 1e-6  # antialiased bicubic: at most ~1 level apart
    assert diff.mean().item() < 0.05 * one_level


def test_gpu_pipeline_decodes_in_bounded_chunks(monkeypatch, images, pil_stage):
    """With a tiny decode budget every JPEG is decoded in its own call: same pixels as one call."""
    blobs = list(images.values())
    spec = pil_stage.scorer.spec
    with ThreadPoolExecutor(2) as pool:
        together, _ = clip_decode.tensor_pixels(blobs, spec, torch.device("cpu"), pool, batched=True)
        monkeypatch.setattr(clip_decode, "DECODE_BUDGET_PIXELS", 1)
        alone, ok = clip_decode.tensor_pixels(blobs, spec, torch.device("cpu"), pool, batched=True)
    assert all(ok)
    assert torch.equal(together, alone)
    assert clip_decode.plan_chunks([5, 5, 5, 20, 1, 1], budget=10) == [[0, 1], [2], [3], [4, 5]]
    assert clip_decode.plan_chunks([], budget=10) == []


def test_batched_decode_isolates_a_failing_image(images):
    """One image the decoder rejects must not fail its batch-mates (nvJPEG fails whole calls)."""
    good = images["jpeg_landscape"]
    broken = good[:600] + bytes(len(good) - 600)  # a header that parses, then zeros: libjpeg gives up
    decoded = clip_decode.decode_jpegs([good, broken, images["jpeg_gray"]], torch.device("cpu"))
    assert decoded[1] is None
    assert decoded[0] is not None and decoded[0].shape == (3, 300, 400)
    assert decoded[2] is not None and decoded[2].shape == (3, 150, 200)  # grey decodes as RGB
    with ThreadPoolExecutor(2) as pool:
        spec = clip_decode.PixelSpec(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
        pixels, ok = clip_decode.tensor_pixels([good, broken], spec, torch.device("cpu"), pool, batched=True)
    assert ok == [True, False] and pixels.shape == (1, 3, 32, 32)


def test_jpeg_routing_sends_only_plain_jpegs_to_nvjpeg(images):
    assert clip_decode.jpeg_header(images["jpeg_landscape"])[1:] == (8, 300, 400, 3)
    assert clip_decode.jpeg_header(images["jpeg_progressive"])[0] == 0xC2
    for name in ("jpeg_landscape", "jpeg_portrait", "jpeg_progressive", "jpeg_gray", "jpeg_thin"):
        header = clip_decode.jpeg_header(images[name])
        assert clip_decode.nvjpeg_friendly(images[name]) == header[2] * header[3] > 0, name
    refused = [images["jpeg_cmyk"], images["png_rgb"], images["webp"], images["jpeg_landscape"][:2000]]
    refused += [b"<html><body>404</body></html>", b"", b"\xff\xd8\xff"]
    assert [clip_decode.nvjpeg_friendly(b) for b in refused] == [0] * len(refused)


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_bad_images_are_reasons_not_errors(images, reference, decoder):
    stage = scorer_stage(pretrained=str(reference[3]), decoder=decoder, batch_size=2)
    good = images["jpeg_landscape"]
    blobs = [good, b"\x00\x01garbage", None, b"<!doctype html><html>not found</html>", good[:3000], b"", good]
    out = stage(shard(blobs, ["the same caption"] * len(blobs)))
    assert out.column("reason").to_pylist() == [
        None,
        DECODE_ERROR,
        NO_IMAGE,
        DECODE_ERROR,
        DECODE_ERROR,
        DECODE_ERROR,
        None,
    ]
    scores = out.column("clip_score").to_pylist()
    assert [s is None for s in scores] == [False, True, True, True, True, True, False]
    assert scores[0] == scores[6]  # the same pair scores the same wherever it sits in the shard


def test_empty_shard_and_shard_without_images(pil_stage):
    empty = pil_stage(shard([]))
    assert empty.num_rows == 0 and {"clip_score", "reason"} <= set(empty.column_names)
    no_images = pil_stage(shard([None, None, None]))
    assert no_images.column("reason").to_pylist() == [NO_IMAGE] * 3
    assert no_images.column("clip_score").null_count == 3


def test_store_embeddings_are_normalised_float16(images, reference):
    stage = scorer_stage(pretrained=str(reference[3]), store_embeddings=True)
    blobs = [images["jpeg_landscape"], b"broken", images["png_rgba"]]
    out = stage(shard(blobs))
    assert out.schema.field("image_embedding").type == pa.list_(pa.float16())
    assert out.schema.field("text_embedding").type == pa.list_(pa.float16())
    assert out.column("image_embedding").to_pylist()[1] is None
    for row in (0, 2):
        image = np.asarray(out.column("image_embedding")[row].as_py(), np.float32)
        text = np.asarray(out.column("text_embedding")[row].as_py(), np.float32)
        assert image.shape == (64,)
        assert abs(np.linalg.norm(image) - 1) < 2e-3 and abs(np.linalg.norm(text) - 1) < 2e-3
        assert abs(float(image @ text) - out.column("clip_score")[row].as_py()) < 3e-3
    plain = scorer_stage(pretrained=str(reference[3]))(shard(blobs))
    assert "image_embedding" not in plain.column_names


def test_batch_size_and_prefetch_do_not_change_scores(images, reference, auto_stage):
    blobs = list(images.values()) * 2
    one = scorer_stage(pretrained=str(reference[3]), batch_size=1)(shard(blobs)).column("clip_score")
    many = auto_stage(shard(blobs)).column("clip_score")
    np.testing.assert_allclose(one.to_numpy(), many.to_numpy(), atol=1e-5)
    deep = scorer_stage(pretrained=str(reference[3]), batch_size=2)
    deep.scorer.prefetch = 3  # CUDA keeps two batches in flight; any depth must give the same rows
    again = deep(shard(blobs)).column("clip_score")
    np.testing.assert_allclose(again.to_numpy(), many.to_numpy(), atol=1e-5)


def test_low_precision_is_a_gpu_setting(images, reference, auto_stage):
    """bf16/fp16 autocast applies on CUDA (tested below); on CPU the stage computes in fp32."""
    blobs = list(images.values())
    bf16 = scorer_stage(pretrained=str(reference[3]), precision="bf16", batch_size=3)
    assert bf16.scorer.dtype is None
    np.testing.assert_array_equal(
        bf16(shard(blobs, CAPTIONS)).column("clip_score").to_numpy(),
        auto_stage(shard(blobs, CAPTIONS)).column("clip_score").to_numpy(),
    )


def test_device_auto_is_decided_on_the_worker(reference):
    stage = ClipScore(ClipScoreConfig(model=str(TINY), pretrained=str(reference[3])))
    assert stage.scorer is None  # nothing loaded or decided at construction (the driver)
    assert stage.resources.gpus == 0
    stage.setup()
    assert stage.scorer.device.type == ("cuda" if CUDA else "cpu")


def test_model_threads_are_restored_after_a_call(images, reference):
    before = torch.get_num_threads()
    stage = scorer_stage(pretrained=str(reference[3]), model_threads=1)
    stage(shard([images["jpeg_landscape"]]))
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------------- checkpoints


def _same_weights(model, reference_model) -> bool:
    mine, theirs = model.state_dict(), reference_model.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _trainer_dir(directory: Path, state: dict) -> Path:
    """What trainer/ writes: open_clip's local-dir format (config JSON + safetensors)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    config = {
        "model_cfg": json.loads(TINY.read_text()),
        "preprocess_cfg": {
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
        },
    }
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "open_clip_model.safetensors"))
    return directory


@pytest.mark.parametrize(
    "form", ["safetensors", "pt_state_dict", "pt_wrapped_ddp", "bin", "local_dir", "plain_dir"]
)
def test_checkpoints_load_in_every_form(form, reference, tmp_path, images):
    state = reference[0].state_dict()
    model_spec, pretrained = str(TINY), None
    if form == "safetensors":
        pretrained = str(reference[3])
    elif form in ("pt_state_dict", "bin"):
        pretrained = str(tmp_path / f"weights.{'pt' if form == 'pt_state_dict' else 'bin'}")
        torch.save(state, pretrained)
    elif form == "pt_wrapped_ddp":
        pretrained = str(tmp_path / "checkpoint.pt")
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, pretrained)
    else:
        directory = _trainer_dir(tmp_path / "run" / "checkpoint", state)
        model_spec = f"local-dir:{directory}" if form == "local_dir" else str(directory)
    model, _, tokenizer = load_clip(model_spec, pretrained)
    assert _same_weights(model, reference[0])
    assert tokenizer(["a"]).shape == (1, 16)  # the config's context length, not the default 77
    if form == "local_dir":  # the stage reads trainer checkpoints by path and scores like the reference
        stage = scorer_stage(model_spec)
        blobs = [images["jpeg_landscape"], images["webp"]]
        got = stage(shard(blobs, CAPTIONS[:2])).column("clip_score").to_numpy()
        np.testing.assert_allclose(got, reference_scores(reference, blobs, CAPTIONS[:2]), atol=1e-3)


def test_mismatched_checkpoint_is_one_line_naming_both(tmp_path):
    from safetensors.torch import save_file

    other_cfg = json.loads(TINY.read_text())
    other_cfg["embed_dim"] = 32
    other_json = tmp_path / "tiny-other.json"
    other_json.write_text(json.dumps(other_cfg))
    torch.manual_seed(1)
    other, _, _ = load_clip(str(other_json))
    checkpoint = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(checkpoint))
    with pytest.raises(ValueError) as err:
        load_clip(str(TINY), str(checkpoint))
    message = str(err.value)
    assert "\n" not in message
    assert str(checkpoint) in message and str(TINY) in message
    assert "text_projection" in message or "visual.proj" in message  # the first key that differs

    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in other.state_dict().items() if not k.startswith("visual.")}, partial)
    with pytest.raises(ValueError, match=r"does not fit architecture .* missing visual\."):
        load_clip(str(other_json), str(partial))


class _Payload:
    """Unpickling this runs ``open(path, "w")``: it creates a file. weights_only must refuse it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("packaging", ["torch_save", "raw_pickle"])
def test_malicious_pickle_is_refused(tmp_path, packaging):
    control = tmp_path / "control-created"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()  # the payload is real: unpickled without weights_only it creates its file

    target = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    if packaging == "torch_save":
        torch.save({"state_dict": {"visual.proj": _Payload(target)}}, checkpoint)
    else:
        checkpoint.write_bytes(pickle.dumps(_Payload(target)))
    with pytest.raises(ValueError) as err:
        load_clip(str(TINY), str(checkpoint))
    assert str(err.value).startswith(f"refusing to load checkpoint {checkpoint}")
    assert "\n" not in str(err.value)
    assert not target.exists()


def test_unknown_model_tag_or_path_fail_before_any_download(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        load_clip("ViT-Q-99")
    with pytest.raises(
        ValueError, match=r"unknown pretrained tag 'no_such_tag' for ViT-B-32; known tags: .*openai"
    ):
        load_clip("ViT-B-32", "no_such_tag")
    with pytest.raises(ValueError, match="not found"):
        load_clip(str(TINY), str(tmp_path / "missing.safetensors"))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"embed_dim": 64}')
    with pytest.raises(ValueError, match="not an open_clip model config"):
        load_clip(str(bad_json))
    with pytest.raises(ValueError, match="no open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path}")


# ------------------------------------------------------------------------------------------ config


def test_config_and_registry():
    assert stage_class("clip_score") is ClipScore and stage_class("clip_filter") is ClipFilter
    assert ClipScore.stateful and "image" in ClipScore(ClipScoreConfig(model=str(TINY))).contract().reads
    assert "image" not in ClipFilter(ClipFilterConfig(threshold=0.2)).contract().reads
    assert ClipScore(ClipScoreConfig(model="ViT-B-32", device="cuda")).resources.gpus == 1.0
    assert ClipScore(ClipScoreConfig(model="ViT-B-32", gpus=0.25, cpus=4)).resources.gpus == 0.25
    with pytest.raises(ValidationError, match="needs gpus > 0"):
        ClipScoreConfig(model="ViT-B-32", device="cuda", gpus=0)
    with pytest.raises(ValidationError, match="not found"):
        ClipScoreConfig(model="ViT-B-32", pretrained="/nonexistent/weights.pt")
    with pytest.raises(ValidationError):
        ClipScoreConfig(model="ViT-B-32", batch_sise=4)  # typo: unknown keys are errors
    with pytest.raises(ValidationError, match="exactly one"):
        ClipFilterConfig(threshold=0.3, fraction=0.3)
    with pytest.raises(ValidationError, match="exactly one"):
        ClipFilterConfig()
    with pytest.raises(ValidationError):
        ClipFilterConfig(fraction=1.5)


# ------------------------------------------------------------------------------------------ filter


def scored(scores: list[float | None]) -> pa.Table:
    return pa.table(
        {"uid": [f"{i:032x}" for i in range(len(scores))], "clip_score": pa.array(scores, pa.float32())}
    )


def run_pool(stage: ClipFilter, shards: list[pa.Table]) -> tuple[dict, list[list[str | None]]]:
    """What the executor does: partial per shard, one fit, apply per shard (with JSON round trip)."""
    partials = [stage.partial(s) for s in shards]
    fitted = json.loads(json.dumps(stage.fit(partials)))
    return fitted, [stage.apply(s, fitted, p).column("reason").to_pylist() for s, p in zip(shards, partials)]


def datacomp_keep(scores: np.ndarray, fraction: float) -> np.ndarray:
    """baselines/apply_filter.py: threshold = -np.sort(-scores)[int(len * fraction)], keep >=."""
    threshold = -np.sort(-scores)[int(len(scores) * fraction)]
    return scores >= threshold


def test_fraction_is_pool_wide_not_per_shard():
    rng = np.random.default_rng(0)
    high = rng.uniform(0.25, 0.40, 500).astype(np.float32)  # a shard of well-matched pairs
    low = rng.uniform(0.05, 0.30, 1500).astype(np.float32)  # and three of mostly poor ones
    shards = [scored(high.tolist())] + [scored(part.tolist()) for part in np.split(low, 3)]
    pool = np.concatenate([high, low])
    fitted, reasons = run_pool(ClipFilter(ClipFilterConfig(fraction=0.3)), shards)
    expected_keep = datacomp_keep(pool, 0.3)
    assert fitted["pool_size"] == 2000
    assert np.float32(fitted["threshold"]) == -np.sort(-pool)[600]
    kept = np.array([r is None for shard_reasons in reasons for r in shard_reasons])
    assert np.array_equal(kept, expected_keep)
    assert kept.sum() == 601  # index int(N * f) is itself kept
    assert {r for rs in reasons for r in rs} == {None, BELOW_THRESHOLD}
    # The same shards fitted one at a time would keep 30% of each: a different (wrong) set.
    per_shard = np.concatenate([datacomp_keep(s.column("clip_score").to_numpy(), 0.3) for s in shards])
    assert not np.array_equal(per_shard, expected_keep)
    # And the single-pool computation through the stage agrees with the sharded one.
    _, single = run_pool(ClipFilter(ClipFilterConfig(fraction=0.3)), [scored(pool.tolist())])
    assert [r is None for r in single[0]] == kept.tolist()


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.integers(-20, 20), min_size=1, max_size=80),  # small integers: many ties
    cuts=st.lists(st.integers(0, 80), max_size=5),
    fraction=st.floats(0.01, 1.0),
)
def test_fraction_matches_datacomp_for_any_split(scores, cuts, fraction):
    values = np.asarray(scores, np.float32) / 20
    bounds = sorted({0, len(values), *[c for c in cuts if c <= len(values)]})
    shards = [scored(values[a:b].tolist()) for a, b in itertools.pairwise(bounds)]
    _, reasons = run_pool(ClipFilter(ClipFilterConfig(fraction=fraction)), shards)
    kept = np.array([r is None for rs in reasons for r in rs])
    if int(len(values) * fraction) < len(values):
        assert np.array_equal(kept, datacomp_keep(values, fraction))
    else:  # fraction 1: DataComp's index is past the end; everything is kept
        assert kept.all()


def test_threshold_keeps_greater_or_equal():
    t = 0.28
    just_below = float(np.nextafter(np.float32(t), np.float32(0)))
    shards = [scored([0.30, 0.25, t]), scored([just_below, None, 1.0]), scored([])]
    fitted, reasons = run_pool(ClipFilter(ClipFilterConfig(threshold=t)), shards)
    assert fitted == {"threshold": t, "pool_size": 5}
    assert reasons == [[None, BELOW_THRESHOLD, None], [BELOW_THRESHOLD, NO_SCORE, None], []]


def test_filter_edge_cases():
    assert pool_threshold(np.zeros(0, np.float32), 0.3) is None
    fitted, reasons = run_pool(ClipFilter(ClipFilterConfig(fraction=0.5)), [scored([]), scored([None])])
    assert fitted == {"threshold": None, "pool_size": 0} and reasons == [[], [NO_SCORE]]
    _, reasons = run_pool(ClipFilter(ClipFilterConfig(fraction=1.0)), [scored([0.1, -0.2]), scored([0.3])])
    assert reasons == [[None, None], [None]]
    earlier = scored([0.9, 0.1]).append_column("reason", pa.array(["language", None]))
    out = ClipFilter(ClipFilterConfig(threshold=0.5))(earlier)
    assert out.column("reason").to_pylist() == ["language", BELOW_THRESHOLD]  # an earlier reason stays
    with pytest.raises(ValueError, match="run clip_score before it"):
        ClipFilter(ClipFilterConfig(threshold=0.5))(pa.table({"uid": ["a"]}))


def test_refiltering_needs_no_model(tmp_path):
    """Re-thresholding reads stored scores only: it runs in a process where torch, open_clip and
    Pillow cannot even be imported."""
    scores_path = tmp_path / "part-00000.parquet"
    import pyarrow.parquet as pq

    pq.write_table(scored([0.1, 0.2, 0.3, 0.4, None]), scores_path)
    script = f"""
import sys
for name in ("torch", "open_clip", "PIL", "torchvision"):
    sys.modules[name] = None  # importing any of these now raises ImportError
sys.path.insert(0, {str(REPO)!r})
import pyarrow.parquet as pq
from pairsift.stages.clip_score import ClipFilter, ClipFilterConfig
table = pq.read_table({str(scores_path)!r})
for cfg in (ClipFilterConfig(threshold=0.25), ClipFilterConfig(fraction=0.5)):
    print(ClipFilter(cfg)(table).column("reason").to_pylist())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    below, none = f"'{BELOW_THRESHOLD}'", f"'{NO_SCORE}'"
    assert result.stdout.splitlines() == [
        f"[{below}, {below}, None, None, {none}]",  # threshold 0.25
        f"[{below}, None, None, None, {none}]",  # N=4: score at index int(4 * 0.5) = 2 of [.4 .3 .2 .1]
    ]


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_nvjpeg_decode_matches_cpu_and_falls_back(images, pil_stage, reference):
    """nvJPEG decodes the plain JPEGs; PNG, WebP and CMYK fall back to Pillow; all agree with PIL."""
    blobs = list(images.values())
    spec = pil_stage.scorer.spec
    with ThreadPoolExecutor(2) as pool:
        on_gpu, ok = clip_decode.tensor_pixels(blobs, spec, torch.device("cuda"), pool)
        on_cpu, _ = clip_decode.pil_pixels(blobs, reference[1], spec, pool)
    assert on_gpu.is_cuda and ok == [True] * len(blobs)
    jpegs = [images[k] for k in ("jpeg_landscape", "jpeg_progressive", "jpeg_gray")]
    decoded = clip_decode.decode_jpegs(jpegs, torch.device("cuda"))
    for gpu_image, cpu_image in zip(decoded, clip_decode.decode_jpegs(jpegs, torch.device("cpu"))):
        assert gpu_image is not None and gpu_image.is_cuda and gpu_image.shape == cpu_image.shape
        assert (gpu_image.cpu().float() - cpu_image.float()).abs().mean().item() < 2.0
    diff = (on_gpu.cpu() - on_cpu).abs()
    assert diff.mean().item() < 0.02  # nvJPEG's IDCT/upsampling differs from libjpeg by a level or so


@pytest.mark.gpu
def test_gpu_stage_bf16_matches_cpu_fp32(images, reference, pil_stage):
    blobs = list(images.values()) + [b"broken", None]
    captions = [*CAPTIONS, "x", "y"]
    gpu = scorer_stage(pretrained=str(reference[3]), device="cuda", precision="bf16", batch_size=4)
    assert gpu.scorer.decoder == "torchvision" and gpu.scorer.device.type == "cuda"
    out = gpu(shard(blobs, captions))
    cpu = pil_stage(shard(blobs, captions))
    assert out.column("reason").to_pylist() == cpu.column("reason").to_pylist()
    np.testing.assert_allclose(
        out.column("clip_score").to_numpy(zero_copy_only=False),
        cpu.column("clip_score").to_numpy(zero_copy_only=False),
        atol=0.03,
    )
