"""Engine calls run one at a time, in arrival order; a cancelled queued call never runs."""

from __future__ import annotations

import asyncio
import threading
import time

from deployments.common.serial_executor import SerialExecutor


def test_calls_run_in_arrival_order_on_one_thread():
    executor = SerialExecutor("test")
    order, threads = [], set()

    def work(i):
        threads.add(threading.get_ident())
        time.sleep(0.01)
        order.append(i)
        return i * i

    async def main():
        return await asyncio.gather(*(executor.run(work, i) for i in range(8)))

    assert asyncio.run(main()) == [i * i for i in range(8)]
    assert order == list(range(8))
    assert len(threads) == 1


def test_cancelled_queued_call_never_starts():
    executor = SerialExecutor("test")
    started = []
    release = threading.Event()

    def blocker():
        release.wait(5)

    async def main():
        first = asyncio.ensure_future(executor.run(blocker))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(executor.run(started.append, "queued"))
        await asyncio.sleep(0.05)
        queued.cancel()
        # asyncio hands the cancel to the executor's future in a loop callback: let it run.
        await asyncio.sleep(0.05)
        release.set()
        await first
        await executor.run(lambda: None)  # drain: anything queued before this has run

    asyncio.run(main())
    assert started == []
