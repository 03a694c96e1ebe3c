"""A worker that processes orders from the channel "orders".

    python examples/worker.py

against the quick-start server (or LINGER_URL; LINGER_TOKEN for a server with --auth).
It needs only Linger itself installed (``pip install -e .``). Ctrl-C or SIGTERM stops it
gracefully: the orders being processed finish, those received but not started go back to
the channel.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from linger.client import AsyncClient, Message, Reject


async def process(order: Message) -> None:
    """Ship one order. An order that can never be shipped is rejected (to orders.dead);
    any other exception makes it come back later, with a growing delay."""
    try:
        data = order.json()
    except ValueError:
        raise Reject("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("item"), str):
        raise Reject("no item")
    quantity = int(data.get("quantity", 1))
    await asyncio.sleep(0.01 * quantity)  # the work
    print(f"order {order.id}: {quantity} x {data['item']}", flush=True)


async def main() -> None:
    url = os.environ.get("LINGER_URL", "http://127.0.0.1:8989")
    async with AsyncClient(url, token=os.environ.get("LINGER_TOKEN")) as linger:
        counters = await linger.consume(
            "orders", process, concurrency=8, batch=10, handler_timeout=60
        )
    print(f"stopped: {counters}", file=sys.stderr)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main())
