"""Hosts that fail honestly (crash, freeze, broken link) are avoided, not banned.

Found by tests/e2e/test_faults.py: when a host died, every session on it reported a
"timeout" at once (an embed's lanes, concurrent jobs), and ten of those crossed the ban
threshold. The ban (15 s, doubling per ban) outlived the host's restart, so with another
replica down jobs failed with "no route" although a healthy replica was running (43 of
200 jobs in the slow run). One outage is now scored once; the routing backoff still grows.
"""

from __future__ import annotations

import trio
import trio.testing

from .test_node import Mesh


async def test_a_burst_of_timeouts_from_one_outage_is_scored_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        a = await mesh.add_joiner(name="a")
        with trio.fail_after(30):
            await founder.wait_for(lambda: a.node_id in founder.rtts())
        for outage in range(3):  # each outage: 40 sessions fail at once, then a success
            for _ in range(40):
                await founder.report(a.node_id, "timeout")
            assert not founder.is_banned(a.node_id), f"banned after outage {outage}"
            assert founder.penalty_s(a.node_id) > 0  # still avoided while it recovers
            founder.report_success(a.node_id)
        counters = founder.counters()
        assert counters["timeout"] == 120 and "ban" not in counters  # counted, not banned
        assert a.node_id in founder.connected()
        for _ in range(3):  # misbehaviour is still scored every time
            await founder.report(a.node_id, "bad_output")
        assert founder.is_banned(a.node_id) and founder.counters()["ban"] == 1
        nursery.cancel_scope.cancel()
