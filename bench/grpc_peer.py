"""The peer for scenario (a): customlang.v1.CustomLangService on grpcio's asyncio server.

Its stubs are generated at run time from proto/customlang/v1/customlang.proto with
grpcio-tools, as any grpcio project would, so the peer shares nothing with microapp
but the proto. It answers what custom-lang without a database answers by default:
`Hello {name} from custom-lang-service!`, and `invalid_argument` for a name over 255
characters.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import grpc

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILE = "customlang/v1/customlang.proto"
MAX_NAME_LENGTH = 255


def generate_stubs(out_dir: Path) -> tuple[ModuleType, ModuleType]:
    """Run grpcio-tools' protoc on the custom-lang proto; import and return (pb2, pb2_grpc)."""
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
    pb2 = importlib.import_module("customlang.v1.customlang_pb2")
    pb2_grpc = importlib.import_module("customlang.v1.customlang_pb2_grpc")
    return pb2, pb2_grpc


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:`port` until cancelled or signalled."""
    pb2, pb2_grpc = generate_stubs(Path(tempfile.mkdtemp(prefix="microapp-bench-grpc-")))

    class CustomLang(pb2_grpc.CustomLangServiceServicer):
        async def Invoke(self, request, context):  # the generated name
            name = request.name or "World"
            if len(name) > MAX_NAME_LENGTH:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name too long")
            return pb2.InvokeResponse(message=f"Hello {name} from custom-lang-service!")

    server = grpc.aio.server()
    pb2_grpc.add_CustomLangServiceServicer_to_server(CustomLang(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()
