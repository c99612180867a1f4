"""The one webdataset tar module: what it writes reads back the same here, in tarfile and in webdataset."""

from __future__ import annotations

import io
import tarfile

import pytest
from webdataset.tariterators import tar_file_expander, url_opener

from pairsift.common import tars
from pairsift.common.tars import (
    TarError,
    index_members,
    index_tar,
    iter_tar_samples,
    members_of,
    read_keys,
    split_name,
    tar_writer,
    write_tar,
)

SAMPLES = [
    [(f"{uid}.jpg", bytes([i]) * (700 + 300 * i)), (f"{uid}.txt", f"caption {i}".encode()),
     (f"{uid}.json", b'{"uid": "%s"}' % uid.encode())]
    for i, uid in enumerate(["0a" * 16, "1b" * 16, "2c" * 16])
]


def write_samples(path, samples=SAMPLES):
    with write_tar(path) as tar:
        for members in samples:
            tar.add_sample(members)
    return path


def tar_of(members: dict[str, bytes], tar_format: int = tarfile.USTAR_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "split"), [
    ("0a0a.jpg", ("0a0a", "jpg")),
    ("a/b.seg.JPG", ("a/b", "seg.jpg")),  # webdataset's key: up to the first dot of the file name
    ("dir.v2/x.txt", ("dir.v2/x", "txt")),  # a dot in a folder name is part of the key
    ("README", ("README", "")),
])
def test_split_name_is_webdatasets(name, split):
    assert split_name(name) == split


def test_round_trip_here_in_tarfile_and_in_webdataset(tmp_path):
    path = write_samples(tmp_path / "00000.tar")
    expected = [member for members in SAMPLES for member in members]
    assert [(m.name, m.read()) for m in members_of(path)] == expected
    with tarfile.open(path) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == expected
    read_by_webdataset = tar_file_expander(url_opener([{"url": str(path)}]))
    assert [(m["fname"], m["data"]) for m in read_by_webdataset] == expected
    assert [(key, sample) for key, sample in iter_tar_samples(path)] == [
        (members[0][0].split(".")[0], {name.split(".")[1]: data for name, data in members}) for members in SAMPLES]


def test_the_same_samples_give_the_same_bytes(tmp_path):
    first = write_samples(tmp_path / "a.tar").read_bytes()
    assert write_samples(tmp_path / "b.tar").read_bytes() == first
    with tarfile.open(tmp_path / "a.tar") as tar:
        headers = {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in tar}
    assert headers == {(0, 0, 0, "", "", 0o644, tarfile.REGTYPE)}
    assert first[257:265] == b"ustar\x0000"  # plain ustar headers: no pax header for short ASCII names
    assert len(first) % 10240 == 0  # tarfile's record padding, as every writer before produced


def test_a_failed_write_leaves_no_tar(tmp_path):
    path = tmp_path / "00000.tar"
    with pytest.raises(RuntimeError), write_tar(path) as tar:
        tar.add_sample(SAMPLES[0])
        raise RuntimeError("killed mid-shard")
    assert list(tmp_path.iterdir()) == []


def test_copy_keeps_a_members_header_and_bytes(tmp_path):
    source = tmp_path / "source.tar"
    with tarfile.open(source, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k" * 120 + ".jpg")  # a pax header for the long name
        info.size, info.mtime, info.uname, info.mode = 5, 1234, "img2dataset", 0o600
        tar.addfile(info, io.BytesIO(b"image"))
    copy = tmp_path / "copy.tar"
    with tar_writer(copy) as out:
        for member in members_of(source):
            out.copy(member)
    assert copy.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_index_matches_tarfiles_offsets(tmp_path, tar_format):
    names = ["k/0001.jpg", "k/0001.txt", "d" * 70 + "/" + "e" * 90 + ".json", "ünï/0002.txt"]
    path = tmp_path / "x.tar"
    path.write_bytes(tar_of({name: bytes([i]) * (700 + i) for i, name in enumerate(names)}, tar_format))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    assert index_members(path) == (expected, None)
    refs, error = index_tar(path)
    assert error is None and [r.key for r in refs] == ["k/0001", "d" * 70 + "/" + "e" * 90, "ünï/0002"]
    assert refs[0].members == {"jpg": expected[0][1:], "txt": expected[1][1:]}


def test_a_truncated_tar_gives_what_was_readable_and_a_clear_error(tmp_path):
    whole = write_samples(tmp_path / "whole.tar").read_bytes()
    spans, _ = index_members(tmp_path / "whole.tar")
    name, offset, _size = spans[3]  # the second sample's image
    path = tmp_path / "cut.tar"
    path.write_bytes(whole[:offset + 100])
    assert index_members(path) == (spans[:3], f"unexpected end of data in {name}")
    assert read_keys(path, {"0a" * 16, "1b" * 16}, {"jpg"}) == {"0a" * 16: SAMPLES[0][0][1]}
    with pytest.raises(TarError, match="unexpected end of data"):
        for member in members_of(path):
            member.read()


def test_bytes_that_are_no_tar_are_an_error_not_an_empty_tar(tmp_path):
    path = tmp_path / "00000.tar"
    path.write_bytes(b"not a tar")
    with pytest.raises(TarError):
        list(members_of(path))
    spans, error = index_members(path)
    assert spans == [] and error


class CountingFile(io.FileIO):
    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        CountingFile.read_bytes += len(data)
        return data


class CountingPath:
    def __init__(self, path):
        self.path = path

    def open(self, mode):
        return CountingFile(self.path, mode.replace("b", ""))


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_the_keyed_reader_reads_only_wanted_members(tmp_path, monkeypatch, tar_format):
    """The header scan reads headers and the wanted data; pax headers (long names) go to tarfile."""
    key = "k" * 120 if tar_format == tarfile.PAX_FORMAT else "k" * 40
    members = {f"{i:04d}.jpg": bytes([i]) * 100_000 for i in range(10)} | {f"{key}.jpg": b"L" * 1025,
                                                                           "0003.txt": b"caption"}
    path = tmp_path / "00000.tar"
    path.write_bytes(tar_of(members, tar_format))
    monkeypatch.setattr(tars, "as_path", CountingPath)
    CountingFile.read_bytes = 0
    found = read_keys(path, {"0003", key, "missing"}, {"jpg"})
    assert found == {"0003": bytes([3]) * 100_000, key: b"L" * 1025}
    if tar_format == tarfile.USTAR_FORMAT:
        assert CountingFile.read_bytes == 13 * 512 + 100_000 + 1025  # every header, two members' data
    CountingFile.read_bytes = 0
    assert read_keys(path, {"0001"}, {"jpg"}) == {"0001": bytes([1]) * 100_000}
    assert CountingFile.read_bytes <= 2 * 512 + 100_000  # stops at the last wanted key
    assert read_keys(tmp_path / "absent.tar", {"0001"}, {"jpg"}) == {}
