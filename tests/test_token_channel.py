"""Token channels without Ray: a replica's outboxes, an ingress's request streams."""

from __future__ import annotations

import asyncio
import random

import pytest

pytest.importorskip("ray.serve")
from deployments.token_channel import Outboxes, RequestStream  # noqa: E402


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(["paged ", "cache ", "block ", "river ", "é", "中"]) for _ in range(n)]


def test_outbox_merges_each_requests_chunks_until_the_channel_reads():
    rng = random.Random()
    texts = {rid: _words(rng, rng.randrange(2, 9)) for rid in ("a", "b", "c")}

    async def main():
        boxes = Outboxes()
        box = boxes.get("ingress")
        for rid, parts in texts.items():  # before any channel: kept
            for i, text in enumerate(parts):
                box.put([rid, text, 1, i == len(parts) - 1,
                         "length" if i == len(parts) - 1 else None, 7 if i == 0 else None, 3,
                         [(i, -0.5 * i)] if rid == "a" else None])
        channel = boxes.read("ingress")
        assert await channel.__anext__() == []  # attached
        assert boxes.attached == 1
        batch = await channel.__anext__()
        assert [c[0] for c in batch] == list(texts)  # one chunk per request, in order
        for chunk in batch:
            parts = texts[chunk[0]]
            logprobs = [(i, -0.5 * i) for i in range(len(parts))] if chunk[0] == "a" else None
            assert chunk[1:] == ["".join(parts), len(parts), True, "length", 7, 3, logprobs]
        box.put(["d", "x", 1, False, None, 5, 0, None])
        assert (await channel.__anext__())[0][:3] == ["d", "x", 1]
        await channel.aclose()
        assert boxes.attached == 0

    asyncio.run(main())


def test_a_newer_channel_of_the_same_ingress_replaces_the_older():
    async def main():
        boxes = Outboxes()
        old, new = boxes.read("i"), boxes.read("i")
        assert await old.__anext__() == []
        assert await new.__anext__() == []
        boxes.get("i").put(["r", "text", 1, True, "stop", 2, 0, None])
        assert (await new.__anext__())[0][1] == "text"
        with pytest.raises(StopAsyncIteration):  # the old one leaves without taking anything
            await asyncio.wait_for(old.__anext__(), 5)

    asyncio.run(main())


def test_an_outbox_is_dropped_once_nothing_needs_it():
    boxes = Outboxes()
    box = boxes.get("i")
    box.requests.add("r")
    boxes.release("i")
    assert "i" in boxes.boxes  # a request still runs
    box.requests.discard("r")
    boxes.release("i")
    assert "i" not in boxes.boxes


def test_request_stream_merges_unread_chunks_and_raises_its_error():
    async def main():
        s = RequestStream("r")
        s.put(["r", "ab", 2, False, None, 9, 4, [(5, -1.0), (6, -2.0)]])
        s.put(["r", "c", 1, False, None, None, 4, [(7, -3.0)]])
        chunk = await s.next_chunk()
        assert chunk[1:3] == ["abc", 3] and (s.prompt_tokens, s.completion_tokens) == (9, 3)
        assert chunk[7] == [(5, -1.0), (6, -2.0), (7, -3.0)]
        waiter = asyncio.ensure_future(s.next_chunk())
        await asyncio.sleep(0)
        s.put(["r", "d", 1, True, "length", None, 4, None])
        assert (await waiter)[3] and s.finish_reason == "length"
        s.fail(RuntimeError("gone"))
        with pytest.raises(RuntimeError, match="gone"):
            await s.next_chunk()

    asyncio.run(main())
