"""The download stage end to end against a real hostile server on 127.0.0.1: every endpoint ends in
its documented reason within the deadline, good images come back decodable at the configured size,
rows keep their order, and a decompression bomb is refused without being decoded."""

from __future__ import annotations

import hashlib
import io
import socket
import time
import tracemalloc

import pyarrow as pa
import pytest
from hostile_server import ENDPOINTS, HostileServer
from PIL import EpsImagePlugin, IcnsImagePlugin, Image, PsdImagePlugin
from pydantic import ValidationError

from pairsift.stages.download import COLUMNS, Download, DownloadConfig, img2dataset_status

DEADLINE_S = 1.5


@pytest.fixture(scope="module")
def server():
    with HostileServer(drip_interval_s=0.5) as running:
        yield running


def make_stage(**overrides) -> Download:
    options = {
        "allow_loopback": True,
        "deadline_s": DEADLINE_S,
        "timeout_s": 5.0,
        "max_bytes": 5_000_000,
        "image_size": 64,
        "thread_count": 8,
    }
    options.update(overrides)
    resolver = options.pop("resolver", None)
    return Download(DownloadConfig(**options), resolver=resolver)


def run(stage: Download, urls: list) -> pa.Table:
    return stage(
        pa.table({"uid": [f"{i:032x}" for i in range(len(urls))], "url": pa.array(urls, pa.string())})
    )


def test_every_hostile_endpoint_ends_with_its_reason_within_the_deadline(server):
    paths = list(ENDPOINTS)
    stage = make_stage()
    stage.setup()  # imports OpenCV/albumentations: not part of what the deadline bounds
    started = time.monotonic()
    out = run(stage, [server.url(p) for p in paths])
    elapsed = time.monotonic() - started
    got = dict(zip(paths, out.column("reason").to_pylist()))
    assert got == ENDPOINTS
    # Drips run in parallel with everything else: the whole shard ends one deadline (plus slack) in.
    assert elapsed < DEADLINE_S + 2.5
    statuses = out.column("status").to_pylist()
    images = out.column("image").to_pylist()
    for path, status, image in zip(paths, statuses, images):
        assert status == img2dataset_status(ENDPOINTS[path]), path
        assert (image is not None) == (ENDPOINTS[path] is None), path


@pytest.mark.parametrize(
    "reason, status",
    [(None, "success"), ("failed_to_download", "failed_to_download"), ("timeout", "failed_to_download"),
     ("too_large", "failed_to_download"), ("refused_address", "failed_to_download"),
     ("opt_out", "failed_to_download"), ("dns_error", "failed_to_download"), ("bad_url", "failed_to_download"),
     ("rate_limited", "failed_to_download"), ("domain_unavailable", "failed_to_download"),
     ("robots_disallowed", "failed_to_download"), ("not_an_image", "failed_to_resize"),
     ("decode_error", "failed_to_resize"), ("image_too_large", "failed_to_resize")],
)
def test_every_reason_maps_to_one_of_img2datasets_statuses(reason, status):
    assert img2dataset_status(reason) == status


FOREIGN = {"/eps-as-jpeg": ("EPS", "PostScript/EPS"), "/psd-as-jpeg": ("PSD", "Photoshop PSD"),
           "/icns-as-jpeg": ("ICNS", "Apple ICNS"), "/pdf-as-jpeg": (None, "PDF")}


def test_foreign_formats_are_refused_before_any_of_their_parsers_runs(server, monkeypatch):
    """EPS, PSD, ICNS and PDF bodies served as image/jpeg: Pillow left to itself hands the first
    three to their plugins (EPS's then runs Ghostscript); the download stage opens none of them."""
    parsed: list[str] = []
    for plugin in (EpsImagePlugin.EpsImageFile, PsdImagePlugin.PsdImageFile, IcnsImagePlugin.IcnsImageFile):
        def recording_open(self, _open=plugin._open, _name=plugin.format):
            parsed.append(_name)
            return _open(self)
        monkeypatch.setattr(plugin, "_open", recording_open)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: parsed.append("gs"))
    for path, (pil_format, _) in FOREIGN.items():  # the bodies are what those plugins would parse
        if pil_format is not None:
            with Image.open(io.BytesIO(server.images[path.lstrip("/")])) as image:
                assert image.format == pil_format
    assert sorted(parsed) == ["EPS", "ICNS", "PSD"]
    parsed.clear()

    rows = run(make_stage(), [server.url(p) for p in FOREIGN]).to_pylist()
    assert parsed == []
    for (path, (_, described)), row in zip(FOREIGN.items(), rows):
        assert (row["reason"], row["status"], row["image"]) == ("not_an_image", "failed_to_resize", None), path
        assert f"{described} document" in row["error"], row["error"]


def test_output_schema_and_row_order(server):
    urls = [server.url("/ok.jpg"), server.url("/404"), None, server.url("/ok.png"), "ftp://x/y.jpg"]
    out = run(make_stage(), urls)
    assert out.column("uid").to_pylist() == [f"{i:032x}" for i in range(5)]
    assert out.column("url").to_pylist() == urls
    for name, kind in COLUMNS.items():
        assert out.schema.field(name).type == kind
    assert out.column("reason").to_pylist() == [None, "failed_to_download", "bad_url", None, "bad_url"]
    assert out.column("error").to_pylist()[0] is None
    assert "404" in out.column("error").to_pylist()[1]


def test_mixed_shard_keeps_order_and_returns_images_of_the_configured_size(server):
    good = ["ok.jpg", "ok.png", "ok.webp", "cmyk.jpg", "animated.gif"]
    bad = {
        "/404": "failed_to_download",
        "/truncated.jpg": "decode_error",
        "/html-as-jpeg": "not_an_image",
        "/noai": "opt_out",
        "/endless": "too_large",
        "/bomb.png": "image_too_large",
    }
    # Interleave 60 rows: good, bad, good, bad ... so a reordering cannot go unnoticed.
    paths = [f"/{good[i % len(good)]}" if i % 2 == 0 else list(bad)[i // 2 % len(bad)] for i in range(60)]
    out = run(
        make_stage(image_size=48, resize_mode="border", encode_format="jpg"), [server.url(p) for p in paths]
    )
    rows = out.to_pylist()
    assert len(rows) == 60
    for path, row in zip(paths, rows):
        if path in bad:
            assert row["reason"] == bad[path] and row["image"] is None and row["width"] is None
            continue
        assert row["reason"] is None and row["status"] == "success"
        served = server.images[path.lstrip("/")]
        assert row["sha256"] == hashlib.sha256(served).hexdigest()  # this row's own bytes, not a neighbour's
        decoded = Image.open(io.BytesIO(row["image"]))
        decoded.load()
        assert decoded.format == "JPEG" and decoded.size == (48, 48) == (row["width"], row["height"])
        with Image.open(io.BytesIO(served)) as original:
            assert (row["original_width"], row["original_height"]) == original.size


@pytest.mark.parametrize(
    "mode, size",
    [
        ("no", (400, 320)),
        ("keep_ratio", (80, 64)),
        ("keep_ratio_largest", (64, 51)),
        ("center_crop", (64, 64)),
        ("border", (64, 64)),
    ],
)
def test_resize_modes_follow_img2dataset(server, mode, size):
    row = run(make_stage(resize_mode=mode), [server.url("/ok.jpg")]).to_pylist()[0]
    assert (row["width"], row["height"]) == size
    assert Image.open(io.BytesIO(row["image"])).size == size
    assert (row["original_width"], row["original_height"]) == (400, 320)


def test_resize_only_if_bigger_leaves_small_images_alone(server):
    row = run(
        make_stage(image_size=1000, resize_mode="keep_ratio", resize_only_if_bigger=True),
        [server.url("/ok.jpg")],
    ).to_pylist()[0]
    assert (row["width"], row["height"]) == (400, 320)


@pytest.mark.parametrize(
    "fmt, quality, pil_format", [("jpg", 90, "JPEG"), ("png", 3, "PNG"), ("webp", 80, "WEBP")]
)
def test_encode_format(server, fmt, quality, pil_format):
    row = run(make_stage(encode_format=fmt, encode_quality=quality), [server.url("/ok.png")]).to_pylist()[0]
    decoded = Image.open(io.BytesIO(row["image"]))
    assert decoded.format == pil_format and decoded.size == (64, 64)


def test_exif_orientation_is_applied(server):
    # Stored 300x150 with left half red; orientation 6 shows it 150x300 with red on top.
    row = run(make_stage(resize_mode="no"), [server.url("/exif-rotated.jpg")]).to_pylist()[0]
    assert (row["original_width"], row["original_height"]) == (150, 300)
    image = Image.open(io.BytesIO(row["image"])).convert("RGB")
    assert image.size == (150, 300)
    top, bottom = image.getpixel((75, 40)), image.getpixel((75, 260))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_cmyk_and_animated_images_come_back_rgb(server):
    rows = run(
        make_stage(resize_mode="no"), [server.url("/cmyk.jpg"), server.url("/animated.gif")]
    ).to_pylist()
    cmyk, gif = (Image.open(io.BytesIO(r["image"])) for r in rows)
    assert cmyk.mode == "RGB" and cmyk.size == (400, 320)
    assert gif.mode == "RGB" and gif.size == (120, 90)
    assert gif.convert("RGB").getpixel((60, 45))[0] > 200  # first frame is red


def test_sixteen_bit_images_keep_their_tones(server):
    """OpenCV keeps 16 bits per channel, and its 8-bit encoders then saturate every pixel to white;
    the stage decodes such files to 8 bits (the high byte) first: 1/8 and 1/2 of full scale stay
    32 and 128."""
    rows = run(make_stage(resize_mode="no"), [server.url("/16bit.png"), server.url("/16bit-gray.png")]).to_pylist()
    for row in rows:
        assert row["reason"] is None, row["error"]
        image = Image.open(io.BytesIO(row["image"])).convert("L")
        assert image.size == (60, 40)
        assert abs(image.getpixel((10, 20)) - 32) <= 3 and abs(image.getpixel((50, 20)) - 128) <= 3


def test_jpeg_and_webp_headers_declaring_50000_squared_are_refused_unread(server):
    rows = run(make_stage(), [server.url("/bomb.jpg"), server.url("/bomb.webp")]).to_pylist()
    assert [r["reason"] for r in rows] == ["image_too_large", "image_too_large"], [r["error"] for r in rows]
    assert all("2500000000 pixels" in r["error"] for r in rows), [r["error"] for r in rows]


def test_bomb_is_refused_from_its_header_without_decoding(server):
    """An 8,000² PNG bomb (64 MB decoded): refused in milliseconds with almost no memory when over
    max_pixels; the same file under a higher max_pixels is decoded, proving the measurement sees it."""
    url = server.url("/bomb.png?side=8000")
    server.bomb(8000)
    refused_stage, decoded_stage = make_stage(max_pixels=50_000_000), make_stage(max_pixels=100_000_000)
    for stage in (refused_stage, decoded_stage):
        stage.setup()

    def peak_mb(stage: Download) -> tuple[dict, float]:
        tracemalloc.start()
        try:
            row = run(stage, [url]).to_pylist()[0]
            return row, tracemalloc.get_traced_memory()[1] / 1e6
        finally:
            tracemalloc.stop()

    refused, refused_peak = peak_mb(refused_stage)
    assert refused["reason"] == "image_too_large" and "64000000" in refused["error"]
    assert refused_peak < 8
    decoded, decoded_peak = peak_mb(decoded_stage)
    assert decoded["reason"] is None and decoded["original_width"] == 8000
    assert decoded_peak > 60


def _process_memory_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def test_encoding_bombs_and_huge_headers_end_in_their_reason_with_bounded_memory(server):
    """Bodies compressed against our Accept-Encoding (2 GiB once inflated, as gzip, deflate or
    labelled image/jpeg) and headers of 1 MB or 5,000 lines: each row ends in its documented reason
    within the deadline while this worker's traced heap and its real peak RSS stay small."""
    paths = ["/gzip-bomb", "/deflate-bomb", "/gzip-bomb.jpg", "/huge-header", "/many-headers"]
    stage = make_stage()
    stage.setup()
    try:  # Linux: writing 5 resets VmHWM, the process's peak resident set, to the current RSS
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        rss_before_kb = _process_memory_kb("VmRSS")
    except OSError:
        rss_before_kb = None
    tracemalloc.start()
    try:
        started = time.monotonic()
        rows = run(stage, [server.url(p) for p in paths * 2]).to_pylist()
        elapsed = time.monotonic() - started
        traced_peak_mb = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    assert [r["reason"] for r in rows] == [ENDPOINTS[p] for p in paths * 2]
    for path, row in zip(paths * 2, rows):
        status = "failed_to_resize" if "bomb" in path else "failed_to_download"
        assert row["status"] == status and row["image"] is None and row["width"] is None
        if "bomb" in path:
            assert row["error"].startswith("not an image pairsift decodes (JPEG, PNG, WEBP, GIF, BMP, TIFF")
            assert "unknown format, starts with b'" + (
                "\\x1f\\x8b" if "gzip" in path else "x\\xda") in row["error"]
        else:
            assert row["error"].startswith("response headers too large: got more than")
    assert elapsed < DEADLINE_S
    assert traced_peak_mb < 40  # 6 compressed bodies of 2 MB, a copy each; one inflated bomb is 2,147 MB
    if rss_before_kb is not None:
        rss_growth_mb = (_process_memory_kb("VmHWM") - rss_before_kb) / 1024
        assert rss_growth_mb < 256, rss_growth_mb


def test_max_pixels_is_checked_per_call_and_pil_global_left_alone(server):
    """max_pixels is this stage's own check: PIL's process-wide limit, which other stages in the same
    worker read, is not changed by setup; a limit PIL itself would refuse to open is a config error."""
    before = Image.MAX_IMAGE_PIXELS
    small, large = make_stage(max_pixels=10_000), make_stage(max_pixels=150_000_000)
    small.setup()
    large.setup()
    assert Image.MAX_IMAGE_PIXELS == before
    rows = run(small, [server.url("/ok.jpg")]).to_pylist()
    assert rows[0]["reason"] == "image_too_large" and "above 10000" in rows[0]["error"]
    assert run(large, [server.url("/ok.jpg")]).to_pylist()[0]["reason"] is None
    with pytest.raises(ValidationError, match="max_pixels"):
        DownloadConfig(max_pixels=2 * (before or 89_478_485) + 1)


def test_sha256_can_be_turned_off(server):
    rows = run(make_stage(compute_sha256=False), [server.url("/ok.jpg")]).to_pylist()
    assert rows[0]["reason"] is None and rows[0]["sha256"] is None


def test_user_agent_carries_the_token(server):
    run(make_stage(user_agent_token="pairsift-test-bot"), [server.url("/ok.jpg?ua")])
    index = server.requests.index("/ok.jpg?ua")
    assert server.request_headers[index]["user-agent"].endswith("(compatible; pairsift-test-bot)")


def test_scoped_opt_out_applies_to_our_token_only(server):
    url = server.url("/robots?tag=pairsift-test-bot%3A+noai")
    ours = run(make_stage(user_agent_token="pairsift-test-bot"), [url]).to_pylist()[0]
    other = run(make_stage(user_agent_token="someone-else"), [url]).to_pylist()[0]
    assert ours["reason"] == "opt_out" and other["reason"] is None


def test_address_policy_applies_in_the_stage_and_nothing_is_dialled(server, monkeypatch):
    dialled: list[str] = []
    real = socket.create_connection

    def record(address, *args, **kwargs):
        dialled.append(address[0])
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError("test guard")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", record)
    names = {"internal.test": ["10.0.0.1"], "metadata.test": ["169.254.169.254"], "ula.test": ["fd00::5"]}

    def resolver(host: str) -> list[str]:
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, host)
        return names[host]

    urls = [
        "http://internal.test/a.jpg",
        "http://metadata.test/latest/",
        "http://ula.test/",
        "http://nowhere.test/",
        "http://0x0a.0.0.1/",
        server.url("/ok.jpg"),
        server.url("/redirect-to?target=http%3A%2F%2Fmetadata.test%2F"),
    ]
    out = run(make_stage(resolver=resolver), urls)
    assert out.column("reason").to_pylist() == [
        "refused_address",
        "refused_address",
        "refused_address",
        "dns_error",
        "refused_address",
        None,
        "refused_address",
    ]
    assert dialled == ["127.0.0.1", "127.0.0.1"]


def test_loopback_is_refused_by_default(server):
    out = run(Download(DownloadConfig(image_size=64)), [server.url("/ok.jpg")])
    assert out.column("reason").to_pylist() == ["refused_address"]


def test_empty_shard_and_missing_url_column():
    stage = make_stage()
    out = run(stage, [])
    assert out.num_rows == 0 and set(COLUMNS) <= set(out.column_names) and "reason" in out.column_names
    with pytest.raises(ValueError, match="no 'url' column"):
        stage(pa.table({"uid": ["a"]}))


@pytest.mark.parametrize(
    "bad",
    [
        {"encode_format": "png"},
        {"resize_mode": "stretch"},
        {"image_size": 0},
        {"thread_count": 0},
        {"user_agent_token": "bot\r\nX-Evil: 1"},
        {"not_an_option": 1},
    ],
)
def test_config_errors_are_caught_when_built(bad):
    with pytest.raises(ValidationError):
        DownloadConfig(**bad)


def test_stage_contract_flags():
    assert Download.name == "download"
    assert Download.config_class is DownloadConfig
    assert Download.stateful is True  # an actor: per-worker caches
    assert "image" not in Download(DownloadConfig()).contract().reads
