// Connect-web transports: Connect with JSON or binary protobuf, or gRPC-Web.
import type { DescService } from "@bufbuild/protobuf";
import { type Client, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";

/** The wire protocols a person can pick in the console. */
export type Protocol = "connect-json" | "connect-binary" | "grpc-web";

export const PROTOCOL_LABELS: Record<Protocol, string> = {
  "connect-json": "Connect (JSON)",
  "connect-binary": "Connect (binary protobuf)",
  "grpc-web": "gRPC-Web",
};

export function isProtocol(value: unknown): value is Protocol {
  return typeof value === "string" && value in PROTOCOL_LABELS;
}

// A call that hangs shows as deadline_exceeded instead of a panel that never settles.
export const CALL_TIMEOUT_MS = 15_000;

/** Adds `Authorization: Bearer <token>` whenever someone is logged in. */
export function bearerInterceptor(token: () => string | null): Interceptor {
  return (next) => async (request) => {
    const value = token();
    if (value) {
      request.header.set("Authorization", `Bearer ${value}`);
    }
    return next(request);
  };
}

/** A transport to one service in the chosen protocol. */
export function createTransport(
  baseUrl: string,
  protocol: Protocol,
  interceptors: Interceptor[],
): Transport {
  if (protocol === "grpc-web") {
    return createGrpcWebTransport({
      baseUrl,
      useBinaryFormat: true,
      interceptors,
      defaultTimeoutMs: CALL_TIMEOUT_MS,
    });
  }
  return createConnectTransport({
    baseUrl,
    useBinaryFormat: protocol === "connect-binary",
    // Greet is NO_SIDE_EFFECTS, so it goes as a cacheable Connect GET.
    useHttpGet: true,
    interceptors,
    defaultTimeoutMs: CALL_TIMEOUT_MS,
  });
}

/** Clients made per call, so a change of protocol or login applies to the next call. */
export class Clients {
  constructor(
    private readonly protocol: () => Protocol,
    private readonly token: () => string | null,
  ) {}

  of<S extends DescService>(service: S, baseUrl: string): Client<S> {
    const transport = createTransport(baseUrl, this.protocol(), [bearerInterceptor(this.token)]);
    return createClient(service, transport);
  }

  get protocolLabel(): string {
    return PROTOCOL_LABELS[this.protocol()];
  }
}
