"""A round-robin HTTP load balancer for receivers, as any proxy in front of them would be.

Per request, not per connection: a webhook sender keeps one connection alive, which an L4
balancer would pin to one receiver for ever. Each request goes to the next upstream whole (body,
headers, answer), so a receiver sees exactly what the provider sent.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


def round_robin_app(upstreams: Sequence[str], served: Counter[str]) -> Starlette:
    """Forward every request to the next of ``upstreams`` (base URLs); count them in ``served``."""
    cycle = itertools.cycle(list(upstreams))
    client = httpx.AsyncClient(timeout=30)

    async def forward(request: Request) -> Response:
        upstream = next(cycle)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            answer = await client.request(
                request.method,
                f"{upstream}{request.url.path}",
                params=request.query_params,
                headers=headers,
                content=await request.body(),
            )
        except httpx.HTTPError:
            return Response(status_code=502)  # the sender retries, as it would behind any proxy
        served[upstream] += 1
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])], lifespan=lifespan)
