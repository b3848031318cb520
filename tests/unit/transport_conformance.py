"""The transport conformance suite, run against every `Transport` implementation.

Rule 1: every check takes only an `OpenNode` factory, so the memory and libp2p transports
are held to exactly the same behaviour (trio's `check_two_way_stream` style).
Rule 2: no check waits on wall-clock time: conditions are awaited under `trio.fail_after`,
and the only periodic action is re-publishing while a gossipsub mesh forms.
Rule 3: this is a plain module of async check functions, not a test file; the test files
parametrize over `ALL_CHECKS`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack

import pytest
import structlog
import trio

from mesh.errors import ClosedError, OversizeMessage, TransportBroken
from mesh.transport.base import Stream, Transport, TransportConfig

MiB = 1024 * 1024

#: `open_node(index, config)` opens a transport whose node id depends only on `index`.
OpenNode = Callable[[int, TransportConfig], AbstractAsyncContextManager[Transport]]
Check = Callable[[OpenNode], Awaitable[None]]

CONFIG = TransportConfig(
    max_frame_bytes=16 * MiB, read_timeout_s=10.0, write_timeout_s=10.0, connect_timeout_s=5.0
)
ECHO = "/nexus/test/echo/1"
WAIT_S = 10.0
REPUBLISH_S = 0.2  # gossipsub's spam guard drops > 10 msg/s per (peer, topic)


def everyone(_node_id: bytes) -> bool:
    return True


async def echo(stream: Stream) -> None:
    while True:
        await stream.send(await stream.receive())


async def open_nodes(
    stack: AsyncExitStack, open_node: OpenNode, count: int, config: TransportConfig = CONFIG
) -> list[Transport]:
    nodes = [await stack.enter_async_context(open_node(i, config)) for i in range(count)]
    for node in nodes:
        node.set_admission(everyone)
        node.set_stream_handler(ECHO, echo)
    return nodes


async def link(a: Transport, b: Transport) -> None:
    await a.connect(b.node_id, b.listen_addrs())


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait for `condition` under the caller's deadline.

    The transports expose no event for "peer gone", so this re-checks every 10 ms; it is
    a condition wait, never a fixed sleep standing in for one.
    """
    while not condition():  # noqa: ASYNC110 - nothing to wait on but a poll (see above)
        await trio.sleep(0.01)


async def round_trip(stream: Stream, payload: bytes) -> bytes:
    """Send one frame and receive the answer (an exchange that must fail as a whole)."""
    await stream.send(payload)
    return await stream.receive()


async def check_echo_sizes(open_node: OpenNode) -> None:
    """Frames of 0 B, 1.5 KB, 1 MiB and 8 MiB round-trip intact, in order."""
    async with AsyncExitStack() as stack:
        a, b = await open_nodes(stack, open_node, 2)
        await link(a, b)
        assert b.node_id in a.connected_peers()
        stream = await a.open_stream(b.node_id, ECHO)
        assert stream.remote_id == b.node_id
        assert stream.protocol == ECHO
        for size in (0, 1500, MiB, 8 * MiB):
            payload = bytes([size % 251]) * size
            await stream.send(payload)
            assert await stream.receive() == payload
        await stream.aclose()


async def check_oversize(open_node: OpenNode) -> None:
    """Oversize on send raises before sending; oversize on receive is the peer's fault."""
    small = TransportConfig(
        max_frame_bytes=64 * 1024, read_timeout_s=10.0, write_timeout_s=10.0, connect_timeout_s=5.0
    )
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_node(0, small))
        b = await stack.enter_async_context(open_node(1, CONFIG))
        for node in (a, b):
            node.set_admission(everyone)
            node.set_stream_handler(ECHO, echo)
        await link(a, b)
        stream = await a.open_stream(b.node_id, ECHO)
        with pytest.raises(OversizeMessage, match="over the limit"):
            await stream.send(b"x" * (64 * 1024 + 1))
        await stream.send(b"still fine")  # nothing was sent: the stream is intact
        assert await stream.receive() == b"still fine"
        await stream.send(b"y" * (64 * 1024))
        assert await stream.receive() == b"y" * (64 * 1024)

        big = await b.open_stream(a.node_id, ECHO)  # a's echo handler has the small limit
        await big.send(b"z" * (64 * 1024 + 1))
        with pytest.raises(TransportBroken):
            await big.receive()  # a reset the stream: the frame was over its limit


async def check_receive_limit(open_node: OpenNode) -> None:
    """`receive(max_bytes=N)` takes frames up to N and refuses a larger one on its length
    prefix: the receiver raises OversizeMessage and the sender sees the stream reset."""
    got: list[bytes | str] = []

    async def limited(stream: Stream) -> None:
        got.append(await stream.receive(max_bytes=16))
        try:
            await stream.receive(max_bytes=16)
        except OversizeMessage:
            got.append("refused")
            raise

    async with AsyncExitStack() as stack:
        a, b = await open_nodes(stack, open_node, 2)
        b.set_stream_handler("/nexus/test/limited/1", limited)
        await link(a, b)
        stream = await a.open_stream(b.node_id, "/nexus/test/limited/1")
        await stream.send(b"x" * 16)
        with pytest.raises(TransportBroken):  # the send or the receive sees the reset
            await round_trip(stream, b"y" * (1024 * 1024))
        assert got == [b"x" * 16, "refused"]


async def check_receive_deadline(open_node: OpenNode) -> None:
    """A passed receive deadline is TransportBroken and leaves the stream usable."""
    async with AsyncExitStack() as stack:
        a, b = await open_nodes(stack, open_node, 2)
        await link(a, b)
        stream = await a.open_stream(b.node_id, ECHO)
        with pytest.raises(TransportBroken, match="deadline"):
            await stream.receive(timeout_s=0.05)
        await stream.send(b"after the deadline")
        assert await stream.receive() == b"after the deadline"


async def check_handler_failure_contained(open_node: OpenNode) -> None:
    """A handler that raises resets its stream only; the transport keeps serving."""

    async def broken(stream: Stream) -> None:
        await stream.receive()
        raise RuntimeError("handler bug (expected by the test)")

    async with AsyncExitStack() as stack:
        a, b = await open_nodes(stack, open_node, 2)
        b.set_stream_handler("/nexus/test/broken/1", broken)
        await link(a, b)
        bad = await a.open_stream(b.node_id, "/nexus/test/broken/1")
        await bad.send(b"trigger")
        with pytest.raises(TransportBroken):
            await bad.receive()
        for _ in range(2):
            good = await a.open_stream(b.node_id, ECHO)
            await good.send(b"alive")
            assert await good.receive() == b"alive"
            await good.aclose()
        assert b.node_id in a.connected_peers()


async def check_admission(open_node: OpenNode) -> None:
    """A non-member may use an open_to_all protocol, and is cut off on any other."""
    async with AsyncExitStack() as stack:
        a, b = await open_nodes(stack, open_node, 2)
        b.set_admission(lambda node_id: node_id != a.node_id)
        b.set_stream_handler("/nexus/test/join/1", echo, open_to_all=True)
        await link(a, b)
        join = await a.open_stream(b.node_id, "/nexus/test/join/1")
        await join.send(b"let me in")
        assert await join.receive() == b"let me in"
        await join.aclose()

        # Which step notices the refusal depends on the transport: dialing, sending or
        # receiving may raise, so the whole exchange is the one statement under test.
        with pytest.raises(TransportBroken):
            await round_trip(await a.open_stream(b.node_id, ECHO), b"hello")
        with trio.fail_after(WAIT_S):
            await wait_until(lambda: a.node_id not in b.connected_peers())
            await wait_until(lambda: b.node_id not in a.connected_peers())


async def _publish_until(
    publisher: Transport, topic: str, data: bytes, received: Callable[[], bool]
) -> None:
    with trio.fail_after(WAIT_S):
        while not received():
            await publisher.publish(topic, data)
            with trio.move_on_after(REPUBLISH_S):
                await wait_until(received)


async def _collect(
    channel: trio.MemoryReceiveChannel[tuple[bytes, bytes]], into: list[tuple[bytes, bytes]]
) -> None:
    async for item in channel:
        into.append(item)


async def check_pubsub(open_node: OpenNode) -> None:
    """Messages reach subscribers one and two hops away; we never get our own back."""
    async with AsyncExitStack() as stack:
        a, b, c = await open_nodes(stack, open_node, 3)
        inbox: dict[bytes, list[tuple[bytes, bytes]]] = {n.node_id: [] for n in (a, b, c)}
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        for node in (a, b, c):
            nursery.start_soon(_collect, node.subscribe("t"), inbox[node.node_id])
        await link(a, b)
        await link(b, c)  # c hears a only through b
        await _publish_until(
            a, "t", b"hello", lambda: bool(inbox[b.node_id]) and bool(inbox[c.node_id])
        )
        assert set(inbox[b.node_id]) == {(a.node_id, b"hello")}
        assert set(inbox[c.node_id]) == {(a.node_id, b"hello")}
        assert inbox[a.node_id] == []
        with pytest.raises(OversizeMessage, match="over the limit"):
            await a.publish("t", b"x" * (CONFIG.max_publish_bytes + 1))


async def check_pubsub_ignores_non_members(open_node: OpenNode) -> None:
    """Pubsub authored by a node the receiver does not admit never reaches the application,
    neither directly nor relayed by a member."""
    async with AsyncExitStack() as stack:
        member, outsider, b = await open_nodes(stack, open_node, 3)
        b.set_admission(lambda node_id: node_id != outsider.node_id)
        b_inbox: list[tuple[bytes, bytes]] = []
        member_inbox: list[tuple[bytes, bytes]] = []
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        nursery.start_soon(_collect, b.subscribe("t"), b_inbox)
        nursery.start_soon(_collect, member.subscribe("t"), member_inbox)
        outsider.subscribe("t")
        await link(outsider, b)
        await link(member, b)
        await link(outsider, member)
        await _publish_until(member, "t", b"real", lambda: bool(b_inbox))
        with structlog.testing.capture_logs() as logs:
            # The member admits the outsider and relays its messages to b, whose author
            # check must drop them.
            await _publish_until(
                outsider,
                "t",
                b"spam",
                lambda: (
                    bool(member_inbox) and any(e.get("reason") == "author_not_member" for e in logs)
                ),
            )
        assert set(b_inbox) == {(member.node_id, b"real")}
        assert set(member_inbox) == {(outsider.node_id, b"spam")}


async def check_disconnect_breaks_streams(open_node: OpenNode) -> None:
    """After disconnect the peer is gone and its streams fail with TransportBroken."""
    async with AsyncExitStack() as stack:
        a, b = await open_nodes(stack, open_node, 2)
        await link(a, b)
        stream = await a.open_stream(b.node_id, ECHO)
        await a.disconnect(b.node_id)
        assert b.node_id not in a.connected_peers()
        with pytest.raises(TransportBroken):  # send or receive, depending on the transport
            await round_trip(stream, b"x")
        await a.disconnect(b.node_id)  # idempotent


async def check_redial_after_restart(open_node: OpenNode) -> None:
    """A peer restarted at a new address is reachable there at once, not at the old one."""
    async with AsyncExitStack() as stack:
        (a,) = await open_nodes(stack, open_node, 1)
        async with open_node(1, CONFIG) as b:
            b.set_admission(everyone)
            old_addrs = b.listen_addrs()
            await link(a, b)
        with trio.fail_after(WAIT_S):
            await wait_until(lambda: not a.connected_peers())
        async with open_node(1, CONFIG) as b2:
            b2.set_admission(everyone)
            b2.set_stream_handler(ECHO, echo)
            assert b2.listen_addrs() != old_addrs
            with pytest.raises(TransportBroken):
                await a.connect(b2.node_id, old_addrs)
            with trio.fail_after(CONFIG.connect_timeout_s):
                await link(a, b2)
            stream = await a.open_stream(b2.node_id, ECHO)
            await stream.send(b"back")
            assert await stream.receive() == b"back"


async def check_close_then_use(open_node: OpenNode) -> None:
    """Everything of a closed transport raises ClosedError, streams included."""
    async with AsyncExitStack() as stack:
        (b,) = await open_nodes(stack, open_node, 1)
        async with open_node(1, CONFIG) as a:
            a.set_admission(everyone)
            await link(a, b)
            stream = await a.open_stream(b.node_id, ECHO)
        attempts: list[Callable[[], Awaitable[object]]] = [
            lambda: a.connect(b.node_id, b.listen_addrs()),
            lambda: a.open_stream(b.node_id, ECHO),
            lambda: a.publish("t", b"x"),
            lambda: stream.send(b"x"),
            lambda: stream.receive(),
        ]
        for attempt in attempts:
            with pytest.raises(ClosedError):
                await attempt()
        with pytest.raises(ClosedError):
            a.subscribe("t")
        with pytest.raises(ClosedError):
            a.set_stream_handler(ECHO, echo)
        await stream.aclose()  # still idempotent and quiet


ALL_CHECKS: tuple[Check, ...] = (
    check_echo_sizes,
    check_oversize,
    check_receive_limit,
    check_receive_deadline,
    check_handler_failure_contained,
    check_admission,
    check_pubsub,
    check_pubsub_ignores_non_members,
    check_disconnect_breaks_streams,
    check_redial_after_restart,
    check_close_then_use,
)
