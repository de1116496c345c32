"""Background tasks: shutdown waits for its own loop's tasks, never for one stranded on a closed loop."""

from __future__ import annotations

import asyncio

from gateway.tasks import drain_background_tasks, spawn


def test_shutdown_does_not_wait_for_a_task_of_a_closed_loop() -> None:
    stranded = asyncio.new_event_loop()
    stranded_task = stranded.create_task(asyncio.sleep(3600))
    stranded.run_until_complete(asyncio.sleep(0))  # the task starts, then its loop stops under it
    from gateway import tasks

    tasks._background.add(stranded_task)  # what spawn() leaves behind when a loop closes under it
    stranded.close()

    async def shutdown() -> bool:
        finished = spawn(asyncio.sleep(0.01))
        await asyncio.wait_for(drain_background_tasks(grace_seconds=3600), timeout=5)
        return finished.done()

    try:
        assert asyncio.run(shutdown())  # its own task was waited for; the stranded one was not
    finally:
        tasks._background.discard(stranded_task)
