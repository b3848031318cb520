"""Test only: makes a daemon started with NEXUS_TEST_LIE=grad a lying training host.

`tests/e2e/test_train_verify.py` starts one daemon with this directory on PYTHONPATH and
that variable set (through its command prefix); Python imports this module at start-up.
The input gradients that daemon's training sessions return are plausible but wrong:
finite, the right shape, 5 % of their scale off. Nothing in the daemon can lie on its own.
"""

from __future__ import annotations

import dataclasses
import os


def _install() -> None:
    import torch

    from atoms.codecs import encode
    from nexusd.exec import train_host
    from nexusd.exec.train_wire import TrainLossResult, TrainOutput
    from nexusd.exec.wire import header_of, tensor_of

    honest = train_host.TrainHost.handle

    async def handle(self, peer, msg, payload):  # type: ignore[no-untyped-def]
        out = await honest(self, peer, msg, payload)
        bent = []
        for reply, enc in out:
            lies = isinstance(reply, TrainOutput | TrainLossResult) and reply.has_tensor
            if lies and enc is not None and type(msg).__name__ in ("TrainBackward", "TrainLoss"):
                t = tensor_of(reply.tensor, enc.data)
                noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(7))
                enc = encode(t + 0.05 * t.abs().max() * noise.to(t.dtype))
                reply = dataclasses.replace(reply, tensor=header_of(enc))
            bent.append((reply, enc))
        return bent

    train_host.TrainHost.handle = handle  # type: ignore[method-assign]


if os.environ.get("NEXUS_TEST_LIE") == "grad":
    _install()
