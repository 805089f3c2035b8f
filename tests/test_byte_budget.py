"""The NBD server's reply budget: backpressure that never deadlocks and lets the smaller holder in first."""

from __future__ import annotations

import asyncio

from liverestore.agent.nbd.server import ByteBudget


def test_a_waiter_that_leaves_does_not_block_the_next_one() -> None:
    """A connection that closes while it waits for the server budget leaves a cancelled entry behind;
    the next release must skip it, or every later request of every connection would wait forever."""

    async def scenario() -> None:
        budget = ByteBudget(100)
        await budget.acquire(80)
        leaver = asyncio.create_task(budget.acquire(50))
        await asyncio.sleep(0)
        assert not leaver.done()
        leaver.cancel()
        await asyncio.gather(leaver, return_exceptions=True)
        budget.release(80)
        assert budget.used == 0
        await asyncio.wait_for(budget.acquire(10), 1.0)
        assert budget.used == 10

    asyncio.run(scenario())


def test_freed_bytes_go_to_the_waiter_holding_least_and_an_oversized_request_runs_alone() -> None:
    async def scenario() -> None:
        budget = ByteBudget(100)
        await budget.acquire(100)
        bulk = asyncio.create_task(budget.acquire(60, held=500))
        guest = asyncio.create_task(budget.acquire(60, held=0))
        await asyncio.sleep(0)
        budget.release(100)
        await asyncio.sleep(0)
        assert guest.done() and not bulk.done()
        budget.release(60)
        await asyncio.wait_for(bulk, 1.0)
        budget.release(60)
        await asyncio.wait_for(budget.acquire(250), 1.0)  # over the limit, but nothing else is held
        assert budget.used == 250

    asyncio.run(scenario())
