"""A hop whose span keeps no KV cache (an output head, a norm) serves every step of a
generation, at any position: automatic placement may leave a host such a span."""

from __future__ import annotations

import trio

from .exec_fixtures import Cluster, Node, tiny_llama
from .test_exec import reference_greedy, routed_greedy, split


async def test_stateless_span_serves_every_generation_step() -> None:
    model = tiny_llama()
    n = len(model.atom_list())
    assert not split(model, [(n - 1, n)])[0].kv_layouts()  # the head keeps no cache
    want = reference_greedy(model, 8)
    a, b = (Node(k, [s]) for k, s in zip("ab", split(model, [(0, n - 1), (n - 1, n)]), strict=True))
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, b])
        sess = cl.session(cl.planner([(0, n - 1, [a.id]), (n - 1, n, [b.id])]))
        await sess.open()
        got = await routed_greedy(sess, 8)
        await sess.close()
        nursery.cancel_scope.cancel()
    assert got == want
    assert cl.failures == []
