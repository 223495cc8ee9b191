"""FairSlots: the places big request bodies take turns for (app._BigBodySlot), shared fairly
between projects (finding: one project's stream of big invalid batches made another project's
78 KB batch wait 0.2-2.5 s)."""

from __future__ import annotations

import anyio
import pytest

from watchllm_ext.slots import FairSlots

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_free_places_are_taken_at_once_then_handed_over_in_turn() -> None:
    slots = FairSlots(1)
    served: list[str] = []

    async def request(key: str, name: str) -> None:
        await slots.acquire(key)
        served.append(name)
        await anyio.sleep(0.01)
        slots.release()

    await slots.acquire("a")  # held: everything below waits, in this order
    async with anyio.create_task_group() as tg:
        for name in ("a1", "a2", "a3"):
            tg.start_soon(request, "a", name)
            await anyio.sleep(0)
        tg.start_soon(request, "b", "b1")
        await anyio.sleep(0)
        tg.start_soon(request, "c", "c1")
        await anyio.sleep(0.01)
        assert slots.waiting == 5
        slots.release()
    # Round robin over the projects waiting, first come first served within one: b and c
    # wait for one of a's requests, not for all three.
    assert served == ["a1", "b1", "c1", "a2", "a3"]
    assert slots.waiting == 0
    await slots.acquire("z")  # the place came back: free again
    slots.release()


async def test_several_places() -> None:
    slots = FairSlots(2)
    await slots.acquire("a")
    await slots.acquire("a")  # both taken at once: places are free
    with anyio.move_on_after(0.05) as scope:
        await slots.acquire("b")
    assert scope.cancelled_caught and slots.waiting == 0  # gave up: left the queue
    slots.release()
    await slots.acquire("b")


async def test_a_waiter_cancelled_after_being_handed_a_place_passes_it_on() -> None:
    import asyncio

    slots = FairSlots(1)
    await slots.acquire("a")
    got: list[str] = []

    async def wait(key: str) -> None:
        await slots.acquire(key)
        got.append(key)
        slots.release()

    b = asyncio.create_task(wait("b"))
    await asyncio.sleep(0.01)
    c = asyncio.create_task(wait("c"))
    await asyncio.sleep(0.01)
    slots.release()  # handed to b, which has not run yet ...
    b.cancel()  # ... and is cancelled before it does (asyncio throws into its wait)
    with pytest.raises(asyncio.CancelledError):
        await b
    with anyio.fail_after(2):  # (a place lost with b would leave c waiting for ever)
        await c
    # The place b was handed went on: c got it, and it is free again after c.
    assert got == ["c"] and slots.waiting == 0
    with anyio.fail_after(1):
        await slots.acquire("d")
