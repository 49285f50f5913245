"""A FastAPI app that publishes events and consumes them while it runs.

``POST /orders`` publishes an order to the stream ``orders``; a consumer of the group
``billing`` bills each one in the background; ``GET /orders/billed`` lists them. On
shutdown the consumer finishes the batch in hand and leaves its group.

Run it with ``python examples/fastapi_app.py`` (the embedded server; set
``STREAMBROKER_REDIS`` to another address, e.g. ``redis://localhost:6379/0``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from pydantic import BaseModel

import streambroker as sb


class Order(BaseModel):
    item: str
    quantity: int


registry = sb.Registry()
registry.register_redis(os.environ.get("STREAMBROKER_REDIS", "embedded"))
registry.register_stream("orders", "default", ["billing"])
config = registry.validate()

billed: list[Order] = []


async def bill(events: list[sb.Event]) -> None:
    billed.extend(event.decode(Order) for event in events)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with config.async_broker() as broker:
        broker.handler("billing")(bill)
        async with sb.AsyncWorker(broker).running():
            app.state.broker = broker
            yield


app = FastAPI(lifespan=lifespan)


@app.post("/orders")
async def create_order(order: Order, request: Request) -> dict[str, str]:
    broker: sb.AsyncBroker = request.app.state.broker
    return {"id": await broker.publish("orders", order.model_dump())}


@app.get("/orders/billed")
async def billed_orders() -> list[Order]:
    return billed


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
