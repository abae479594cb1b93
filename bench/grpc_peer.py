"""The peer for scenario (a): greeter.v1.GreeterService on grpcio's asyncio server.

Its stubs are generated at run time from proto/greeter/v1/greeter.proto with
grpcio-tools, as any grpcio project would, so the peer shares nothing with microapp
but the proto. It answers what the benchmarked greeter answers with its fake caller.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import grpc

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILE = "greeter/v1/greeter.proto"
FAKE_EXTERNAL_STATUS = 200
FAKE_EXTERNAL_BODY_LENGTH = 1256


def generate_stubs(out_dir: Path) -> tuple[ModuleType, ModuleType]:
    """Run grpcio-tools' protoc on the greeter proto; import and return (pb2, pb2_grpc)."""
    from grpc_tools import protoc

    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            PROTO_FILE,
        ]
    )
    if code != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with exit code {code}")
    sys.path.insert(0, str(out_dir))
    pb2 = importlib.import_module("greeter.v1.greeter_pb2")
    pb2_grpc = importlib.import_module("greeter.v1.greeter_pb2_grpc")
    return pb2, pb2_grpc


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:`port` until cancelled or signalled."""
    pb2, pb2_grpc = generate_stubs(Path(tempfile.mkdtemp(prefix="microapp-bench-grpc-")))

    class Greeter(pb2_grpc.GreeterServiceServicer):
        async def Greet(self, request, context):  # the generated name
            name = request.name or "World"
            if len(name) > 255:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name too long")
            return pb2.GreetResponse(
                message=f"Hello {name} from greeter-service!",
                external_status=FAKE_EXTERNAL_STATUS,
                external_body_length=FAKE_EXTERNAL_BODY_LENGTH,
            )

    server = grpc.aio.server()
    pb2_grpc.add_GreeterServiceServicer_to_server(Greeter(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()
