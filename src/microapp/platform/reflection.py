"""gRPC server reflection for our Connect services, so `buf curl` needs no `--schema`."""

from __future__ import annotations

from collections.abc import Iterable

# connectrpc-grpcreflect ships no stubs or py.typed; its types are inferred from its source.
from connectrpc_grpcreflect import (  # pyright: ignore[reportMissingTypeStubs]
    ServerReflectionAlphaASGIApplication,
    ServerReflectionAlphaService,
    ServerReflectionASGIApplication,
    ServerReflectionService,
)
from google.protobuf.descriptor import FileDescriptor
from protobuf import DescFile

# protobuf-py builds its descriptors from a serialized FileDescriptorProto; this is the
# documented entry point its own generated code uses, and the bridge from Google's
# generated modules (the card's protobuf runtime) to what connectrpc-grpcreflect takes.
# (Its `stubs` parameter names protobuf-py's `Extension` without type arguments.)
from protobuf._codegen import file_desc  # pyright: ignore[reportUnknownVariableType]


def _to_desc_file(file: FileDescriptor, cache: dict[str, DescFile]) -> DescFile:
    if file.name not in cache:
        deps = [_to_desc_file(dep, cache) for dep in file.dependencies]
        cache[file.name] = file_desc(file.serialized_pb, deps, {})
    return cache[file.name]


def reflection_apps(
    files: Iterable[FileDescriptor],
) -> list[ServerReflectionASGIApplication | ServerReflectionAlphaASGIApplication]:
    """The v1 and v1alpha reflection apps describing the services in `files`."""
    cache: dict[str, DescFile] = {}
    descs = [_to_desc_file(f, cache) for f in files]
    return [
        ServerReflectionASGIApplication(ServerReflectionService(*descs)),
        # v1alpha for older grpcurl and buf versions.
        ServerReflectionAlphaASGIApplication(ServerReflectionAlphaService(*descs)),
    ]
