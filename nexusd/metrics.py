"""Counters and gauges, exposed as Prometheus text on a local port.

Rule 1: every rejection, ban and job outcome increments a counter with a `reason` or `code`
label, so "why was this dropped" is answered by numbers as well as by the log.
Rule 2: the endpoint binds only where configured (127.0.0.1 by default) and only when a port
is set; it serves GET /metrics and nothing else.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NoReturn

import structlog
import trio

log = structlog.get_logger(__name__)

LabelKey = tuple[tuple[str, str], ...]


class Metrics:
    """A process-local registry of labelled counters and gauges."""

    def __init__(self) -> None:
        self._counters: dict[str, dict[LabelKey, float]] = defaultdict(dict)
        self._gauges: dict[str, dict[LabelKey, float]] = defaultdict(dict)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._counters[name]
        series[key] = series.get(key, 0.0) + amount

    def set_total(self, name: str, value: float, **labels: str) -> None:
        """Set a counter to a total kept elsewhere (e.g. the mesh node's own counters)."""
        self._counters[name][tuple(sorted(labels.items()))] = value

    def set(self, name: str, value: float, **labels: str) -> None:
        self._gauges[name][tuple(sorted(labels.items()))] = value

    def value(self, name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        return self._counters.get(name, {}).get(key, self._gauges.get(name, {}).get(key, 0.0))

    def snapshot(self) -> dict[str, float]:
        """Flat `name{labels}` -> value map (for `status --json` and tests)."""
        out: dict[str, float] = {}
        for kind in (self._counters, self._gauges):
            for name, series in kind.items():
                for key, value in series.items():
                    out[_series_name(name, key)] = value
        return out

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        for kind, type_name in ((self._counters, "counter"), (self._gauges, "gauge")):
            for name in sorted(kind):
                lines.append(f"# TYPE nexus_{name} {type_name}")
                for key, value in sorted(kind[name].items()):
                    lines.append(f"nexus_{_series_name(name, key)} {value:g}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"Metrics({len(self._counters)} counters, {len(self._gauges)} gauges)"


def _series_name(name: str, key: LabelKey) -> str:
    if not key:
        return name
    labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
    return f"{name}{{{labels}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve `GET /metrics` over HTTP/1.0; `task_status.started(port)` once listening."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics_listening", host=host, port=bound)
    task_status.started(bound)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(5):
                    head = await stream.receive_some(4096)
                    ok = head.startswith(b"GET /metrics ")
                    body = metrics.render().encode() if ok else b"not found\n"
                    status = b"200 OK" if ok else b"404 Not Found"
                    await stream.send_all(
                        b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                    )
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                return

    await trio.serve_listeners(handle, listeners)
