"""Direct channels: stream conformance, admission, tampering, and exec over a DirectStream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import structlog
import torch
import trio

from atoms.atom import ForwardContext
from mesh.errors import (
    ClosedError,
    DecryptionFailed,
    MalformedMessage,
    OversizeMessage,
    PeerProtocolError,
    TransportBroken,
    UnexpectedPeer,
    UnknownSender,
)
from mesh.identity import NodeKey
from mesh.transport.base import Stream, StreamHandler, Transport, TransportConfig
from mesh.transport.direct import DirectListener, connect_direct, open_direct_listener
from nexusd.exec.session import HopPlan, RemoteHop, StepInput
from nexusd.exec.wire import HOST_INBOUND, ORIGIN_INBOUND, ExecChannel

from . import transport_conformance as conformance
from .exec_fixtures import Node, tiny_llama
from .test_node import Mesh, daemon_view_of

CONFIG = conformance.CONFIG
LOCAL = "127.0.0.1"
ALICE, BOB, CAROL = (NodeKey.from_seed(bytes([i]) * 32) for i in (1, 2, 3))


def everyone(_node_id: bytes) -> bool:
    return True


class DirectNode:
    """Test adapter: one node's direct listener seen through `Transport`.

    Just enough of the protocol for the conformance checks that apply to a point-to-point
    stream: `connect` remembers an address, `open_stream` dials and handshakes, handlers are
    chosen by the protocol the dialer named, and closing the node closes the streams it
    opened. Direct channels carry no pubsub, so `publish`/`subscribe` work only as far as
    the close check needs (ClosedError once closed).
    """

    def __init__(self, key: NodeKey, config: TransportConfig, directory: dict[bytes, str]) -> None:
        self.node_id: bytes = key.node_id  # Transport declares a plain bytes attribute
        self._key = key
        self._config = config
        self._directory = directory
        self._handlers: dict[str, StreamHandler] = {}
        self._is_member: Callable[[bytes], bool] = lambda _node: False
        self._peers: dict[bytes, str] = {}
        self._streams: list[Stream] = []
        self._closed = False
        self.listener: DirectListener | None = None

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"direct node {self.node_id.hex()[:8]} is closed")

    def listen_addrs(self) -> list[str]:
        assert self.listener is not None
        return [f"{self.listener.host}:{self.listener.port}"]

    def set_stream_handler(
        self, protocol: str, handler: StreamHandler, *, open_to_all: bool = False
    ) -> None:
        self._check_open()
        self._handlers[protocol] = handler

    def set_admission(self, is_member: Callable[[bytes], bool]) -> None:
        self._is_member = is_member

    def set_connection_handler(self, on_connect: Callable[[bytes], None]) -> None:
        return  # a direct listener tells nobody of connections (admission is its own)

    async def dispatch(self, stream: Stream) -> None:
        handler = self._handlers.get(stream.protocol)
        if handler is None:
            raise PeerProtocolError(f"no handler for {stream.protocol}")
        await handler(stream)

    async def connect(self, node_id: bytes, addrs: list[str]) -> None:
        self._check_open()
        self._peers[node_id] = addrs[0]

    async def open_stream(self, node_id: bytes, protocol: str) -> Stream:
        self._check_open()
        host, port = self._peers.get(node_id, self._directory[node_id]).split(":")
        stream = await connect_direct(
            self._key, (host, int(port)), node_id, self._config, protocol=protocol
        )
        self._streams.append(stream)
        return stream

    async def disconnect(self, node_id: bytes) -> None:
        self._peers.pop(node_id, None)

    def connected_peers(self) -> frozenset[bytes]:
        return frozenset(self._peers)

    async def publish(self, topic: str, data: bytes) -> None:
        self._check_open()
        raise NotImplementedError("direct channels carry no pubsub")

    def subscribe(self, topic: str) -> trio.MemoryReceiveChannel[tuple[bytes, bytes]]:
        self._check_open()
        raise NotImplementedError("direct channels carry no pubsub")

    async def aclose(self) -> None:
        self._closed = True
        for stream in self._streams:
            await stream.aclose()


def direct_opener() -> conformance.OpenNode:
    directory: dict[bytes, str] = {}

    @asynccontextmanager
    async def open_node(index: int, config: TransportConfig) -> AsyncIterator[Transport]:
        node = DirectNode(NodeKey.from_seed(bytes([index + 1]) * 32), config, directory)
        async with open_direct_listener(
            node._key, LOCAL, 0, config, lambda n: node._is_member(n), node.dispatch
        ) as listener:
            node.listener = listener
            directory[node.node_id] = node.listen_addrs()[0]
            try:
                yield node
            finally:
                await node.aclose()

    return open_node


POINT_TO_POINT = (
    conformance.check_echo_sizes,
    conformance.check_oversize,
    conformance.check_receive_limit,
    conformance.check_receive_deadline,
    conformance.check_close_then_use,
)


@pytest.mark.parametrize("check", POINT_TO_POINT, ids=lambda c: c.__name__)
async def test_conformance(check: conformance.Check) -> None:
    with trio.fail_after(20):
        await check(direct_opener())


async def echo(stream: Stream) -> None:
    while True:
        await stream.send(await stream.receive())


async def test_stream_names_the_authenticated_peer_and_protocol() -> None:
    seen: list[tuple[bytes, str]] = []

    async def handler(stream: Stream) -> None:
        seen.append((stream.remote_id, stream.protocol))
        await echo(stream)

    async with open_direct_listener(BOB, LOCAL, 0, CONFIG, everyone, handler) as bob:
        stream = await connect_direct(ALICE, bob.addr, BOB.node_id, CONFIG, protocol="/t/1")
        await stream.send(b"hi")
        assert await stream.receive() == b"hi"
        assert (stream.remote_id, stream.protocol) == (BOB.node_id, "/t/1")
        assert seen == [(ALICE.node_id, "/t/1")]
        await stream.aclose()


async def test_send_many_writes_several_frames_at_once() -> None:
    async with open_direct_listener(BOB, LOCAL, 0, CONFIG, everyone, echo) as bob:
        stream = await connect_direct(ALICE, bob.addr, BOB.node_id, CONFIG)
        await stream.send_many((b"envelope", b"", b"payload" * 1000))
        assert [await stream.receive() for _ in range(3)] == [b"envelope", b"", b"payload" * 1000]
        with pytest.raises(OversizeMessage, match="over the limit"):
            await stream.send_many((b"ok", b"x" * (CONFIG.max_frame_bytes + 1)))
        await stream.send(b"nothing was sent before")
        assert await stream.receive() == b"nothing was sent before"
        await stream.aclose()
        with pytest.raises(ClosedError):
            await stream.send_many((b"late",))


async def test_message_is_one_frame_bounded_by_its_header_length() -> None:
    # The echo sees a message as one frame (header length, header, payload sealed together).
    async with open_direct_listener(BOB, LOCAL, 0, CONFIG, everyone, echo) as bob:
        stream = await connect_direct(ALICE, bob.addr, BOB.node_id, CONFIG)
        await stream.send_message(b"header", b"payload" * 1000)
        assert await stream.receive_message(max_header_bytes=64) == (b"header", b"payload" * 1000)
        await stream.send_message(b"", b"")
        assert await stream.receive_message(max_header_bytes=0) == (b"", b"")
        with pytest.raises(OversizeMessage, match="over the limits"):
            await stream.send_message(b"h", b"x" * (CONFIG.max_frame_bytes + 1))
        await stream.send_message(b"h" * 65, b"p")
        with pytest.raises(MalformedMessage, match="message header of 65 bytes"):
            await stream.receive_message(max_header_bytes=64)
        with pytest.raises(TransportBroken):  # a peer protocol error closes the stream
            await stream.receive_message(max_header_bytes=64)

        stream = await connect_direct(ALICE, bob.addr, BOB.node_id, CONFIG)
        await stream.send(b"\0\0\0\x10short")  # announces a 16-byte header in a 9-byte frame
        with pytest.raises(MalformedMessage, match="past the 9-byte frame"):
            await stream.receive_message(max_header_bytes=64)
        stream = await connect_direct(ALICE, bob.addr, BOB.node_id, CONFIG)
        await stream.send(b"\0\0")
        with pytest.raises(MalformedMessage, match="no header length"):
            await stream.receive_message(max_header_bytes=64)
        await stream.aclose()


async def test_non_member_is_refused_after_the_handshake_with_a_logged_reason() -> None:
    async with open_direct_listener(
        BOB, LOCAL, 0, CONFIG, lambda n: n != ALICE.node_id, echo
    ) as bob:
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(TransportBroken, match="did not admit us"),
        ):
            await connect_direct(ALICE, bob.addr, BOB.node_id, CONFIG)
        assert bob.refused == 1
        refusal = [e for e in logs if e["event"] == "direct_refused"]
        assert refusal == [
            {
                "event": "direct_refused",
                "reason": "not_member",
                "peer": ALICE.node_id.hex()[:8],
                "error": None,
                "log_level": "warning",
            }
        ]


async def test_banned_or_revoked_member_is_cut_off_and_refused_on_the_direct_channel(
    tmp_path: Path,
) -> None:
    """Wired as the daemon wires it (`MeshService.is_member` as the listener's gate, its
    `_close_direct` on the node's exclusion hook): a member that gets banned, or revoked,
    loses its open direct streams and cannot handshake again. Real sockets, real clock."""
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        a = await mesh.add_joiner(name="a")
        b = await mesh.add_joiner(name="b")
        svc = daemon_view_of(founder, tmp_path, nursery)
        async with open_direct_listener(
            founder.key, LOCAL, 0, CONFIG, svc.is_member, echo
        ) as listener:
            svc.direct = listener
            founder.on_peer_excluded(svc._close_direct)
            streams = {}
            for member in (a, b):
                stream = await connect_direct(member.key, listener.addr, founder.node_id, CONFIG)
                assert await conformance.round_trip(stream, b"hello") == b"hello"
                streams[member.node_id] = stream
            await founder.report(a.node_id, "bad_output", weight=1000.0)  # banned
            await founder.revoke(b.node_id)
            with structlog.testing.capture_logs() as logs:
                for member in (a, b):
                    with pytest.raises(TransportBroken):  # its open stream was closed
                        await conformance.round_trip(streams[member.node_id], b"still there?")
                    with pytest.raises(TransportBroken, match="did not admit us"):
                        await connect_direct(member.key, listener.addr, founder.node_id, CONFIG)
            assert listener.refusals == {"not_member": 2}
            assert [e["peer"] for e in logs if e["event"] == "direct_refused"] == [
                a.node_id.hex()[:8],
                b.node_id.hex()[:8],
            ]
        nursery.cancel_scope.cancel()


async def test_impostor_claiming_a_members_id_is_refused() -> None:
    impostor = NodeKey.from_seed(b"m" * 32)
    impostor.node_id = ALICE.node_id  # claims Alice's id, signs with its own key
    async with open_direct_listener(BOB, LOCAL, 0, CONFIG, everyone, echo) as bob:
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(TransportBroken, match="did not admit us"),
        ):
            await connect_direct(impostor, bob.addr, BOB.node_id, CONFIG)
        refusal = [e for e in logs if e["event"] == "direct_refused"]
        assert [e["reason"] for e in refusal] == ["handshake_failed"]
        assert "InvalidSignature" in refusal[0]["error"]


async def test_dialer_refuses_a_listener_that_is_not_the_expected_node() -> None:
    async with open_direct_listener(BOB, LOCAL, 0, CONFIG, everyone, echo) as bob:
        with pytest.raises(UnexpectedPeer, match=f"expected node {CAROL.node_id.hex()[:8]}"):
            await connect_direct(ALICE, bob.addr, CAROL.node_id, CONFIG)
        with pytest.raises(UnknownSender, match="not a member"):
            await connect_direct(ALICE, bob.addr, BOB.node_id, CONFIG, is_member=lambda n: False)
        with pytest.raises(ValueError, match="ourselves"):
            await connect_direct(BOB, bob.addr, BOB.node_id, CONFIG)


async def test_handshake_deadline_against_a_silent_listener() -> None:
    quick = TransportConfig(connect_timeout_s=0.05)
    listeners = await trio.open_tcp_listeners(0, host=LOCAL)  # accepts, never answers
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(TransportBroken, match="deadline passed"):
        await connect_direct(ALICE, (LOCAL, port), BOB.node_id, quick)
    for listener in listeners:
        await listener.aclose()


class Relay:
    """A TCP relay between a dialer and a listener that can corrupt or replay one chunk."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode: str | None = None  # "flip" or "replay", applied once
        self.direction = "to_listener"

    # trio-typing (a libp2p dependency) ships stale trio stubs that shadow trio's own types
    # and do not export TaskStatus; unused-ignore keeps this right if those stubs go away.
    async def run(
        self,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined, unused-ignore]
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOCAL)
        task_status.started(listeners[0].socket.getsockname()[1])
        async with listeners[0]:
            client = await listeners[0].accept()
        server = await trio.open_tcp_stream(*self.target)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, "to_listener")
            nursery.start_soon(self._pump, server, client, "to_dialer")

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, direction: str) -> None:
        try:
            while chunk := await src.receive_some():
                if self.mode is not None and direction == self.direction:
                    mode, self.mode = self.mode, None
                    if mode == "flip":
                        chunk = chunk[:-1] + bytes([chunk[-1] ^ 0x01])
                    else:
                        await dst.send_all(chunk)
                await dst.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # one side hung up: the test looks at the endpoints, not the relay
        await dst.aclose()


async def with_relay(test: Callable[[Stream, Relay, list[BaseException]], Awaitable[None]]) -> None:
    """Run `test` on a stream Alice -> relay -> Bob (echo); the list gets Bob's errors."""
    errors: list[BaseException] = []

    async def recording_echo(stream: Stream) -> None:
        try:
            await echo(stream)
        except Exception as exc:
            errors.append(exc)
            raise

    async with (
        open_direct_listener(BOB, LOCAL, 0, CONFIG, everyone, recording_echo) as bob,
        trio.open_nursery() as nursery,
    ):
        relay = Relay(bob.addr)
        port = await nursery.start(relay.run)
        stream = await connect_direct(ALICE, (LOCAL, port), BOB.node_id, CONFIG)
        await stream.send(b"clean")
        assert await stream.receive() == b"clean"
        with trio.fail_after(5):
            await test(stream, relay, errors)
        nursery.cancel_scope.cancel()


async def test_frame_tampered_towards_the_dialer_kills_the_stream() -> None:
    async def flip(stream: Stream, relay: Relay, _errors: list[BaseException]) -> None:
        relay.mode, relay.direction = "flip", "to_dialer"
        await stream.send(b"activation")
        with pytest.raises(DecryptionFailed, match="does not authenticate"):
            await stream.receive()
        with pytest.raises(TransportBroken, match="peer protocol error"):
            await stream.send(b"more")

    await with_relay(flip)


@pytest.mark.parametrize("mode", ["flip", "replay"])
async def test_frame_tampered_or_replayed_towards_the_listener_kills_the_stream(mode: str) -> None:
    async def attack(stream: Stream, relay: Relay, errors: list[BaseException]) -> None:
        relay.mode = mode
        with structlog.testing.capture_logs() as logs:
            await stream.send(b"activation")
            if mode == "replay":
                assert await stream.receive() == b"activation"  # the first copy is fine
            with pytest.raises(TransportBroken):
                await stream.receive()  # Bob dropped the connection
        assert len(errors) == 1 and isinstance(errors[0], DecryptionFailed)
        assert any(e["event"] == "stream_peer_misbehaved" for e in logs)

    await with_relay(attack)


async def test_exec_channel_over_a_direct_stream_matches_local_logits() -> None:
    model = tiny_llama()
    host = Node("host", [model])
    origin = Node("origin", [])
    members = {host.id, origin.id}

    async def serve_exec(stream: Stream) -> None:
        channel = ExecChannel(
            stream, host.signer, host.verifier, members.__contains__, HOST_INBOUND
        )
        await host.host.serve(channel, idle_timeout_s=5)

    prompt = torch.tensor([[5, 17, 42, 8, 3]])
    with torch.inference_mode():
        ctx = ForwardContext.for_tokens(
            1, 5, start=0, causal=True, cache=model.new_session_cache(1, 32, 1 << 24)
        )
        want = model(prompt, ctx)
    async with open_direct_listener(
        host.key, LOCAL, 0, CONFIG, members.__contains__, serve_exec
    ) as listener:
        stream = await connect_direct(origin.key, listener.addr, host.id, CONFIG)
        channel = ExecChannel(
            stream, origin.signer, origin.verifier, members.__contains__, ORIGIN_INBOUND
        )
        hop = RemoteHop(HopPlan(host.id, 0, 6), "tiny", channel, step_timeout_s=5)
        await hop.open(1, 32)
        got, timing = await hop.step(0, StepInput(prompt, 0, True, b""))
        await hop.close()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert timing.host == host.id
