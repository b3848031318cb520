"""The execution protocol: activations between an origin and the hosts of a route.

Rule 1: every message is a header (one of the records below) and a tensor payload (empty
when the message has none) on a long-lived stream. On a stream the
transport does not authenticate per frame (libp2p), the header travels inside a signed
envelope (domain `nexus/act/1`) that also signs the payload's BLAKE2b digest, so a
tampered or truncated tensor is rejected before it is decoded. On a channel that
authenticates every frame itself (the direct channel: a signed handshake binding both
node ids, AEAD with per-direction counters), the per-message signature adds nothing but
cost (0.6 ms per round trip, measured by bench/hop), so the header travels bare, header
and payload sealed as one frame (`DirectStream.send_message`: one AEAD, one read and one
wake-up per message); membership is still checked on every message.
Rule 2: tensors are decoded only through `atoms.codecs` (length, dtype, finiteness
checked); a host or origin never trusts a peer's tensor before that.
Rule 3: steps of a session carry consecutive ids; a host applies each id once and answers
a repeated id from its stored result (the origin may resend after a timeout).
Rule 4: a header frame over `MAX_HEADER_BYTES` is refused on its length prefix; the
channel's `is_member` (the daemon's refuses banned and revoked peers) is checked on every
message, so a peer cut off mid-stream gets no further answer.
Rule 5 (forwarding, `[exec] forward_mode = "forward"`): the origin sends a step to the
first host with the rest of the route (`Step.route`); each host sends its output straight
to the next host, into the session the origin opened there (`Step.origin`, authorised by
that session's secret `forward_token`, which only the origin and the route's hosts learn,
over encrypted channels), and a copy of it to the origin after that (off the critical
path): the origin keeps every hop's input for replay and spot checks as in relay mode.
Rule 6 (reduction, `[exec] host_argmax`): a step whose `reduce` is "argmax" asks the host
that returns the final result (the one with no further `route`) for the int64 (B,) argmax
of its output's last position instead of the (B, T, V) logits, sent in the exact `raw`
codec; "last" asks it for the last position's logits only, (B, 1, V), in the session's
codec (a generation that samples, or a spot check of a reducing step, reads no other).
Either way its LM head projects the last position only (`ForwardContext.logits_to_keep`).
Hosts that forward pass the field on and send full outputs (their copies to the origin
included). Only a span that ends in logits (the model's LM head) reduces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, cast

import structlog
import torch
import trio

from atoms.codecs import Encoded, decode
from mesh.errors import InvalidSignature, UnknownSender
from mesh.hlc import HybridClock
from mesh.identity import EnvelopeVerifier, NodeKey, seal_large
from mesh.wire import decode_any, encode, record

log = structlog.get_logger(__name__)

EXEC_PROTOCOL = "/nexus/exec/1.0.0"
EXEC_DOMAIN = "nexus/act/1"
SESSION_ID_BYTES = 16
# A message's first frame: a record (or its signed envelope) whose largest field is a step's
# pad mask, B x positions bytes; 1 MiB covers any step `max_step_tokens` allows. The tensor
# frame that follows is bounded by the transport's frame limit.
MAX_HEADER_BYTES = 1024 * 1024


@record("x.tensor")
@dataclass(frozen=True, slots=True)
class TensorHeader:
    """Metadata of the tensor that follows as the payload frame."""

    dtype: str
    shape: tuple[int, ...]
    codec: str


@record("x.open")
@dataclass(frozen=True, slots=True, kw_only=True)
class OpenSession:
    """Start a session on atoms [start, end) of a model; max_len 0 means no KV cache."""

    session_id: bytes
    model_id: str
    start: int
    end: int
    batch: int
    max_len: int
    reply_codec: str = "raw"
    # Forwarding (Rule 5): a host holding this token may step the session with its output
    # on the origin's behalf; empty: only the origin steps it.
    forward_token: bytes = b""

    def __post_init__(self) -> None:
        if self.forward_token and len(self.forward_token) != SESSION_ID_BYTES:
            raise ValueError(f"forward_token: expected {SESSION_ID_BYTES} bytes or none")
        if len(self.session_id) != SESSION_ID_BYTES:
            raise ValueError(
                f"session_id: expected {SESSION_ID_BYTES} bytes, got {len(self.session_id)}"
            )
        if not 0 <= self.start < self.end:
            raise ValueError(f"span: expected 0 <= start < end, got [{self.start}, {self.end})")
        if not 1 <= self.batch <= 4096 or not 0 <= self.max_len <= 1 << 20:
            raise ValueError(
                f"batch 1..4096 and max_len 0..2^20 expected, got {self.batch}, {self.max_len}"
            )


@record("x.opened")
@dataclass(frozen=True, slots=True)
class SessionOpened:
    session_id: bytes
    cache_bytes: int


@record("x.fwdhop")
@dataclass(frozen=True, slots=True)
class ForwardHop:
    """Where a host sends its output next: a session the origin opened on `host`."""

    host: bytes
    session_id: bytes
    step_id: int
    token: bytes

    def __post_init__(self) -> None:
        if len(self.session_id) != SESSION_ID_BYTES or len(self.token) != SESSION_ID_BYTES:
            raise ValueError(f"session_id and token: expected {SESSION_ID_BYTES} bytes each")
        if self.step_id < 0:
            raise ValueError(f"step_id must be >= 0, got {self.step_id}")


MAX_ROUTE_HOPS = 64
REDUCTIONS = ("", "argmax", "last")  # Step.reduce: "" = the full output (Rule 6)


@record("x.step")
@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One forward step: the tensor is the span's input; `position` is the first new token's.

    `pad_mask` is B x (position + T) bytes of 0/1 (1 = real token), or empty for none.
    Forwarding (Rule 5): `route` names the hops the output goes to next (the first gets
    it from this host); `origin` and `token` are set when another host forwards the step
    into a session `origin` opened (the token is that session's `forward_token`).
    `reduce` (Rule 6): "argmax" asks the final host for the int64 (B,) argmax of the last
    position instead of its full output; "last" for the last position's logits (B, 1, V);
    "" for the full output.
    """

    session_id: bytes
    step_id: int
    position: int
    causal: bool
    tensor: TensorHeader
    pad_mask: bytes = b""
    route: tuple[ForwardHop, ...] = ()
    origin: bytes = b""
    token: bytes = b""
    reduce: str = ""

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {self.reduce!r:.40}")
        if self.step_id < 0 or self.position < 0:
            raise ValueError(
                f"step_id and position must be >= 0, got {self.step_id}, {self.position}"
            )
        if len(self.route) > MAX_ROUTE_HOPS:
            raise ValueError(f"route: at most {MAX_ROUTE_HOPS} hops, got {len(self.route)}")


@record("x.result")
@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    session_id: bytes
    step_id: int
    tensor: TensorHeader
    compute_s: float
    queue_s: float
    # Forwarding: why the output could not be sent on to the next hop ("" = it was, or
    # there was none); the origin then continues the step from that hop itself.
    forward_error: str = ""


@record("x.close")
@dataclass(frozen=True, slots=True)
class CloseSession:
    session_id: bytes


@record("x.fail")
@dataclass(frozen=True, slots=True)
class ExecFailure:
    """A host's refusal of a message; `code` is stable (see FAILURE_CODES)."""

    session_id: bytes
    step_id: int
    code: str
    message: str


FAILURE_CODES = (
    "bad_input",
    "not_hosted",
    "no_session",
    "out_of_order",
    "cache_exhausted",
    "busy",
    "internal",
)
HOST_INBOUND = (OpenSession, Step, CloseSession)
ORIGIN_INBOUND = (SessionOpened, StepResult, ExecFailure)


class FrameStream(Protocol):
    """What the channel needs of a transport stream (mesh.transport.base.Stream)."""

    remote_id: bytes

    async def send(self, payload: bytes) -> None: ...
    async def receive(
        self, *, timeout_s: float | None = None, max_bytes: int | None = None
    ) -> bytes: ...
    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Signer:
    """Our key and clock, shared by every channel of the daemon."""

    key: NodeKey
    clock: HybridClock


class ExecChannel:
    """A stream carrying signed exec messages in both directions.

    Args:
        stream: the transport stream (its remote id was authenticated by the transport).
        signer: our key and clock.
        verifier: the daemon's envelope verifier (shared replay cache).
        is_member: whether a node id may talk to us.
        expect: the record types this side accepts.
    """

    def __init__(
        self,
        stream: FrameStream,
        signer: Signer,
        verifier: EnvelopeVerifier,
        is_member: IsMember,
        expect: tuple[type, ...],
    ) -> None:
        self.stream = stream
        self._signer = signer
        self._verifier = verifier
        self._is_member = is_member
        self._expect = expect
        self.signed = not getattr(stream, "channel_authenticated", False)
        self._messages = None if self.signed else cast("MessageStream", stream)
        # A host answers forwarded steps on the origin's channel from another channel's
        # loop: the two frames of a signed message must not interleave with another's.
        self._send_lock = trio.Lock()

    async def send(self, msg: object, tensor: Encoded | None = None) -> None:
        payload = tensor.data if tensor is not None else b""
        if self._messages is not None:
            await self._messages.send_message(encode(msg), payload)
            return
        env = seal_large(
            self._signer.key,
            EXEC_DOMAIN,
            encode(msg),
            payload,
            clock=self._signer.clock,
            now=time.time(),
        )
        async with self._send_lock:
            await self.stream.send(env)
            await self.stream.send(payload)

    async def receive(self, *, timeout_s: float | None = None) -> tuple[object, bytes]:
        """The next message and its raw payload bytes (decode tensors with `tensor_of`).

        Raises:
            PeerProtocolError (and subclasses): a bad signature, replay, foreign sender,
                sender other than the stream's authenticated peer, or malformed record.
            TransportBroken: the stream broke or the deadline passed.
        """
        if self._messages is not None:
            raw, payload = await self._messages.receive_message(
                timeout_s=timeout_s, max_header_bytes=MAX_HEADER_BYTES
            )
            if not self._is_member(self.stream.remote_id):
                raise UnknownSender("exec peer is no longer a member of the mesh")
            return decode_any(raw, self._expect), payload
        raw = await self.stream.receive(timeout_s=timeout_s, max_bytes=MAX_HEADER_BYTES)
        payload = await self.stream.receive(timeout_s=timeout_s)
        env, large = self._verifier.open_large(
            raw, payload, domain=EXEC_DOMAIN, now=time.time(), is_known=self._is_member
        )
        if env.sender != self.stream.remote_id:
            raise InvalidSignature("exec message signed by a node other than the stream's peer")
        return decode_any(large.header, self._expect), payload

    async def aclose(self) -> None:
        await self.stream.aclose()


class MessageStream(Protocol):
    """A stream that authenticates every frame and carries a (header, payload) message in
    one frame (`mesh.transport.direct.DirectStream`)."""

    async def send_message(self, header: bytes, payload: bytes) -> None: ...
    async def receive_message(
        self, *, timeout_s: float | None = None, max_header_bytes: int
    ) -> tuple[bytes, bytes]: ...


class IsMember(Protocol):
    def __call__(self, node_id: bytes, /) -> bool: ...


def tensor_of(header: TensorHeader, payload: bytes) -> torch.Tensor:
    """Decode a message's tensor (validated: dtype, length, finiteness)."""
    return decode(Encoded(header.dtype, header.shape, header.codec, payload))


def header_of(enc: Encoded) -> TensorHeader:
    return TensorHeader(enc.dtype, enc.shape, enc.codec)
