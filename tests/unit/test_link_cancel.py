"""A stop must stop: cancellation that races a message is never swallowed.

On Python 3.11, `asyncio.wait_for` returns the result when its awaitable
completes in the same loop turn as the cancellation, and the cancelled task
runs on; a daemon's task group then waits for it forever (seen in CI as an
agent ignoring SIGTERM).
"""

from __future__ import annotations

import asyncio

import pytest

from fedd.link import Link, Message


def test_a_cancel_racing_a_message_still_cancels_the_reader() -> None:
    async def scenario() -> None:
        link = Link(host="127.0.0.1", port=1, client_id="cancel-race")
        reader = asyncio.create_task(link.next_message(timeout=30.0))
        await asyncio.sleep(0)  # the reader now waits on the queue
        link._enqueue(Message("t", b"x", False))  # the message and the stop, same turn
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader

    asyncio.run(scenario())
