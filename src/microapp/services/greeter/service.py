"""greeter.v1.GreeterService: greet, after asking the caller service about the outside world."""

from __future__ import annotations

import logging

from connectrpc.request import RequestContext

from microapp.gen.greeter.v1.greeter_connect import GreeterService
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest, GreetResponse
from microapp.services.greeter.core import Caller, GreeterCore, check_name

logger = logging.getLogger(__name__)

__all__ = ["Caller", "GreeterHandler", "greeting_for"]


def greeting_for(name: str) -> str:
    """The greeting text; an empty name greets the World."""
    return f"Hello {name or 'World'} from greeter-service!"


class GreeterHandler(GreeterService):
    """Implements the generated `greeter.v1.GreeterService` protocol."""

    def __init__(self, core: GreeterCore) -> None:
        self._core = core

    async def greet(
        self, request: GreetRequest, ctx: RequestContext[GreetRequest, GreetResponse]
    ) -> GreetResponse:
        check_name(request.name)
        name = request.name or "World"
        external = await self._core.call_caller()
        message = greeting_for(name)
        await self._core.record(name, message, external.status_code)
        logger.debug("greeted", extra={"greeted": name, "external_status": external.status_code})
        return GreetResponse(
            message=message,
            external_status=external.status_code,
            external_body_length=external.body_length,
        )
