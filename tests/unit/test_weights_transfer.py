"""Weights over the mesh and at rest: blobs fetched in pieces from several peers, resumed,
verified, a corrupt sender refused and named; sealed files unreadable without the secret."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from atoms.errors import WeightsError
from mesh.blobs import PIECE_BYTES, BlobUnavailable, download, serve_blobs
from mesh.errors import DecryptionFailed
from mesh.identity.at_rest import HEADER_BYTES, SealedFiles, is_sealed
from mesh.scoring import DEFAULT_WEIGHTS
from mesh.state import HostedSpan, PublishedAtom, PublishedModel
from mesh.transport.base import Stream
from mesh.transport.memory import MemoryNetwork, open_memory_transport
from mesh.wire import decode, encode
from nexusd.model_files import PartSink, WeightFiles

from .transport_conformance import everyone

PROTO = "/nexus/weights/1"
SECRET = bytes(range(32))


def node_id(i: int) -> bytes:
    return bytes([i + 1]) * 32


def blob(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Source:
    data: bytes
    reads: int = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return self.data[offset : offset + length]


def sink_for(tmp_path: Path, data: bytes) -> PartSink:
    digest = hashlib.blake2b(data, digest_size=32).hexdigest()
    files = WeightFiles(SealedFiles(SECRET), seal_new=True)
    return PartSink(tmp_path / f"{digest}.safetensors", digest, len(data), files)


async def _run(
    tmp_path: Path,
    data: bytes,
    served: list[bytes],
    sink: PartSink | None = None,
    sources: list[Source] | None = None,
) -> tuple[PartSink, list[tuple[bytes, str]], list[Source], BaseException | None]:
    """Peers 1..n serve `served[i]` under the digest of `data`; peer 0 downloads."""
    digest = hashlib.blake2b(data, digest_size=32).digest()
    network = MemoryNetwork(rng=random.Random(1))
    sink = sink or sink_for(tmp_path, data)
    sources = sources or [Source(b) for b in served]
    blamed: list[tuple[bytes, str]] = []
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        transports = [
            await nursery.start(_attach, network, node_id(i)) for i in range(len(served) + 1)
        ]
        for i, t in enumerate(transports[1:]):
            src = sources[i]

            async def handler(stream: Stream, src: Source = src) -> None:
                await serve_blobs(stream, lambda d, s=src: s, idle_timeout_s=5)

            t.set_stream_handler(PROTO, handler)
        me = transports[0]
        peers = [t.node_id for t in transports[1:]]
        for t in transports[1:]:
            await me.connect(t.node_id, t.listen_addrs())

        async def open_stream(peer: bytes) -> Stream:
            return await me.open_stream(peer, PROTO)

        async def bad(peer: bytes, reason: str) -> None:
            blamed.append((peer, reason))

        try:
            await download(
                digest, len(data), sink, peers, open_stream, timeout_s=5, on_bad_peer=bad
            )
        except BlobUnavailable as exc:
            error = exc
        nursery.cancel_scope.cancel()
    return sink, blamed, sources, error


async def _attach(
    network: MemoryNetwork, nid: bytes, *, task_status: trio.TaskStatus[object]
) -> None:
    async with open_memory_transport(network, nid) as t:
        t.set_admission(everyone)
        task_status.started(t)
        await trio.sleep_forever()


async def test_fetch_from_several_peers_lands_sealed_and_verified(tmp_path: Path) -> None:
    data = blob(3 * PIECE_BYTES + 1234)
    sink, blamed, sources, error = await _run(tmp_path, data, [data, data, data])
    assert error is None and blamed == []
    assert is_sealed(sink.target) and not sink.part.exists()
    assert SealedFiles(SECRET).read(sink.target) == data
    assert sum(s.reads > 0 for s in sources) >= 2  # the pieces came from several peers


async def test_a_peer_serving_corrupt_bytes_is_refused_and_named(tmp_path: Path) -> None:
    data = blob(4 * PIECE_BYTES + 7)
    bad = bytes(b ^ 0x40 for b in data)  # every piece it sends is wrong
    sink, blamed, sources, error = await _run(tmp_path, data, [bad, data])
    assert error is None and sources[0].reads > 0
    assert blamed == [(node_id(1), "bad_content")]  # the honest peer is never named
    assert SealedFiles(SECRET).read(sink.target) == data
    assert "bad_weights" in DEFAULT_WEIGHTS


async def test_only_corrupt_peers_means_no_file(tmp_path: Path) -> None:
    data = blob(PIECE_BYTES // 2)
    bad = bytes(b ^ 1 for b in data)
    sink, blamed, _, error = await _run(tmp_path, data, [bad])
    assert isinstance(error, BlobUnavailable)
    assert blamed == [(node_id(1), "bad_content")]
    assert not sink.target.exists() and not sink.part.exists()  # its bytes are discarded


async def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path) -> None:
    data = blob(4 * PIECE_BYTES)
    sink = sink_for(tmp_path, data)
    for i in (0, 2):  # an earlier download stored pieces 0 and 2, then stopped
        sink.write(i, data[i * PIECE_BYTES : (i + 1) * PIECE_BYTES])
    assert sink.stored() == {0, 2}
    _, blamed, sources, error = await _run(tmp_path, data, [data], sink)
    assert error is None and blamed == []
    assert sources[0].reads == 2  # only pieces 1 and 3 were asked for
    assert SealedFiles(SECRET).read(sink.target) == data


def test_sealed_file_needs_the_secret_and_refuses_a_flipped_byte(tmp_path: Path) -> None:
    data = blob(PIECE_BYTES + 100)
    path = tmp_path / "w.safetensors"
    SealedFiles(SECRET).write(path, data)
    raw = path.read_bytes()
    assert data[:64] not in raw and is_sealed(path)
    assert SealedFiles(SECRET).read(path) == data
    assert SealedFiles(SECRET).read_range(path, PIECE_BYTES - 5, 10) == data[-105:-95]
    with pytest.raises(DecryptionFailed, match="another mesh secret"):
        SealedFiles(bytes(32)).read(path)
    with pytest.raises(WeightsError, match="no mesh secret"):
        WeightFiles(None, seal_new=False).read(path)
    for where in (HEADER_BYTES + 10, len(raw) - 1, 20):  # a chunk, the last tag, the header
        flipped = bytearray(raw)
        flipped[where] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(WeightsError, match=str(path)):
            WeightFiles(SealedFiles(SECRET), seal_new=True).read(path)
    path.write_bytes(raw[: len(raw) - 50])  # truncated
    with pytest.raises(DecryptionFailed):
        SealedFiles(SECRET).read(path)
    path.write_bytes(raw)
    moved = tmp_path / "other.safetensors"  # sealed under one name, served as another
    moved.write_bytes(raw)
    with pytest.raises(DecryptionFailed, match="does not authenticate"):
        SealedFiles(SECRET).read(moved)


def test_a_plain_weight_file_is_hashed_against_its_name(tmp_path: Path) -> None:
    data = blob(1000)
    path = tmp_path / f"{hashlib.blake2b(data, digest_size=32).hexdigest()}.safetensors"
    path.write_bytes(data)
    files = WeightFiles(SealedFiles(SECRET), seal_new=True)
    assert files.read(path) == data
    path.write_bytes(data[:-1] + b"x")
    with pytest.raises(WeightsError, match="is corrupt"):
        files.read(path)


def test_manifest_records_are_validated_and_round_trip() -> None:
    rec = PublishedModel(
        "llama",
        '{"a":1}',
        (PublishedAtom(0, "embed", bytes(32), 10),),
        model_id="m",
        version=2,
        manifest_digest=bytes(32),
        tokenizer_digest=b"",
        parent="base",
    )
    assert decode(encode(rec), PublishedModel) == rec
    span = HostedSpan("m", 0, 1, "float32", bytes(32))
    assert decode(encode(span), HostedSpan) == span
    with pytest.raises(ValueError, match="manifest_digest"):
        PublishedModel("llama", "{}", (), manifest_digest=b"short")
    with pytest.raises(ValueError, match="config_json"):
        PublishedModel("llama", "{" + " " * 20000 + "}", ())
    with pytest.raises(ValueError, match="span manifest"):
        HostedSpan("m", 0, 1, "float32", b"x")


class Unreadable(Source):
    def read(self, offset: int, length: int) -> bytes:
        raise OSError("disk error")


async def test_a_server_whose_file_fails_says_not_found_and_nobody_is_blamed(
    tmp_path: Path,
) -> None:
    data = blob(1000)
    _, blamed, _, error = await _run(tmp_path, data, [data], sources=[Unreadable(data)])
    assert isinstance(error, BlobUnavailable) and blamed == []
