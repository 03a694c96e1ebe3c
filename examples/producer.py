"""Adds orders to the channel "orders" for ``worker.py``.

    python examples/producer.py [COUNT]

against the quick-start server (or LINGER_URL; LINGER_TOKEN for a server with --auth).
Each order may be delivered 5 times; after that, or when the worker rejects it, it waits
in "orders.dead" (see ``linger stats`` and ``linger redrive orders.dead``).
"""

from __future__ import annotations

import json
import os
import random
import sys

from linger.client import Client, Item

ITEMS = ("apples", "pears", "plums", "quinces")
# Orders per request (the server takes up to its --max-batch, 1000 by default).
BATCH = 500


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    url = os.environ.get("LINGER_URL", "http://127.0.0.1:8989")
    orders = [
        Item(
            json.dumps({"item": random.choice(ITEMS), "quantity": random.randint(1, 5)}),
            content_type="application/json",
        )
        for _ in range(count)
    ]
    with Client(url, token=os.environ.get("LINGER_TOKEN")) as linger:
        added = 0
        for start in range(0, count, BATCH):
            batch = orders[start : start + BATCH]
            added += len(linger.add_many("orders", batch, deliver=5, dead="orders.dead"))
        print(f"{added} orders added; waiting: {linger.channel_stats('orders').ready}")


if __name__ == "__main__":
    main()
