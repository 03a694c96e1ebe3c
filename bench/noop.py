"""An aiohttp server that answers the cycle's requests the way Linger does, with nothing
behind them: what the Python HTTP stack alone manages on this machine, the same event
loop (uvloop) and the same wrk script as Linger's figures.

    python -m bench.noop --port=PORT
"""

from __future__ import annotations

import argparse
import itertools

import uvloop
from aiohttp import web

_BODY = b"x" * 256
_ids = itertools.count(1)


async def post(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"id": next(_ids)}, status=202)


async def get(request: web.Request) -> web.Response:
    headers = {"Content-Type": "text/plain", "x-linger-msg-id": str(next(_ids))}
    return web.Response(body=_BODY, headers=headers)


async def delete(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def stats(request: web.Request) -> web.Response:
    return web.json_response({})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.noop")
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    app = web.Application()
    app.router.add_post("/channels/{channel}", post)
    app.router.add_get("/channels/{channel}", get)
    app.router.add_delete("/messages/{id}", delete)
    app.router.add_get("/stats", stats)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
