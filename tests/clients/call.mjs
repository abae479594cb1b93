// Call unary methods of running services with connect-node, an independent Connect
// client, and print what each call returned as one JSON array on stdout.
//
// One method, its requests one after another on one transport:
//
//   node call.mjs --descriptor-set FILE --service pkg.v1.Service --method Name \
//     --base-url http://127.0.0.1:PORT [--protocol connect|grpc|grpcweb] \
//     [--http-version 1.1|2] [--binary] [--requests FILE]
//
// FILE (or stdin) holds a JSON array of request messages in their proto JSON form; they are
// sent one after another on one transport (so over HTTP/1.1 they share a keep-alive pool).
//
// A batch of calls, each with its own method and transport settings:
//
//   node call.mjs --descriptor-set FILE --calls FILE
//
// FILE (or stdin with `-`) holds a JSON array of calls:
//   {"service": "pkg.v1.Service", "method": "Name", "baseUrl": "http://127.0.0.1:PORT",
//    "protocol": "connect"|"grpc"|"grpcweb", "httpVersion": "1.1"|"2", "binary": bool,
//    "gzip": bool, "headers": {...}, "timeoutMs": N, "requests": [{...}, ...],
//    "concurrency": N}
// Only service, method, baseUrl and requests are required. A call's requests are sent at most
// `concurrency` at a time (default 1). Calls with the same transport settings share one
// transport, so over HTTP/2 they share one session (one connection). The output holds one
// array of results per call, in order.
//
// The schema comes from a FileDescriptorSet (`buf build -o FILE`), so no generated code is
// needed. Each result is {"ok": true, "response": {...}} or {"ok": false, "code":
// "snake_case", "message": "..."}; in a batch, each result also carries the response's
// "headers" and "trailers" (lower-case names).

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { createFileRegistry, fromBinary, fromJson, toJson } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  compressionGzip,
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";

const { values: args } = parseArgs({
  options: {
    "descriptor-set": { type: "string" },
    service: { type: "string" },
    method: { type: "string" },
    "base-url": { type: "string" },
    protocol: { type: "string", default: "connect" },
    "http-version": { type: "string", default: "1.1" },
    binary: { type: "boolean", default: false },
    requests: { type: "string" },
    calls: { type: "string" },
  },
});

function usage(message) {
  console.error(`call.mjs: ${message}`);
  process.exit(2);
}

const batch = args.calls !== undefined;
for (const required of batch
  ? ["descriptor-set"]
  : ["descriptor-set", "service", "method", "base-url"]) {
  if (!args[required]) usage(`--${required} is required`);
}

const registry = createFileRegistry(
  fromBinary(FileDescriptorSetSchema, readFileSync(args["descriptor-set"])),
);

const transports = {
  connect: createConnectTransport,
  grpc: createGrpcTransport,
  grpcweb: createGrpcWebTransport,
};

/** The unary method `name` of `serviceName`, or exit with a usage error. */
function findMethod(serviceName, name) {
  const service = registry.getService(serviceName);
  if (!service) usage(`no service ${serviceName} in the descriptor set`);
  const method = service.methods.find((m) => m.name === name);
  if (!method || method.methodKind !== "unary") {
    usage(`no unary method ${name} in ${serviceName}`);
  }
  return { service, method };
}

/** A transport for these settings, one per distinct settings (so one HTTP/2 session). */
const transportCache = new Map();
function transportFor({ baseUrl, protocol = "connect", httpVersion = "1.1", binary = false, gzip = false }) {
  const key = JSON.stringify([baseUrl, protocol, httpVersion, binary, gzip]);
  if (!transportCache.has(key)) {
    const makeTransport = transports[protocol];
    if (!makeTransport) usage(`protocol must be one of ${Object.keys(transports).join(", ")}`);
    const compression = gzip
      ? { sendCompression: compressionGzip, acceptCompression: [compressionGzip], compressMinBytes: 0 }
      : { acceptCompression: [] };
    transportCache.set(
      key,
      makeTransport({ baseUrl, httpVersion, useBinaryFormat: binary, ...compression }),
    );
  }
  return transportCache.get(key);
}

/** `ResourceExhausted` -> `resource_exhausted`, the Connect protocol's spelling. */
function codeName(code) {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
}

function headersObject(headers) {
  return headers ? Object.fromEntries(headers.entries()) : {};
}

/** Send one request; never throws: an error becomes a result. */
async function callOnce(client, method, json, options, withMetadata) {
  let headers;
  let trailers;
  const callOptions = {
    ...options,
    onHeader: (h) => (headers = h),
    onTrailer: (t) => (trailers = t),
  };
  let result;
  try {
    const response = await client[method.localName](fromJson(method.input, json), callOptions);
    result = { ok: true, response: toJson(method.output, response) };
  } catch (err) {
    const error = ConnectError.from(err);
    result = { ok: false, code: codeName(error.code), message: error.rawMessage };
    headers ??= error.metadata;
  }
  if (withMetadata) {
    result.headers = headersObject(headers);
    result.trailers = headersObject(trailers);
  }
  return result;
}

/** Send `requests`, at most `concurrency` at a time; results in the requests' order. */
async function callAll(client, method, requests, options, concurrency, withMetadata) {
  const results = new Array(requests.length);
  let next = 0;
  async function worker() {
    while (next < requests.length) {
      const index = next++;
      results[index] = await callOnce(client, method, requests[index], options, withMetadata);
    }
  }
  await Promise.all(Array.from({ length: Math.max(1, concurrency) }, worker));
  return results;
}

if (batch) {
  const calls = JSON.parse(readFileSync(args.calls === "-" ? 0 : args.calls, "utf8"));
  const output = [];
  for (const call of calls) {
    const { service, method } = findMethod(call.service, call.method);
    const client = createClient(service, transportFor(call));
    const options = {};
    if (call.headers) options.headers = call.headers;
    if (call.timeoutMs) options.timeoutMs = call.timeoutMs;
    output.push(
      await callAll(client, method, call.requests, options, call.concurrency ?? 1, true),
    );
  }
  finish(output);
} else {
  const { service, method } = findMethod(args.service, args.method);
  const transport = transportFor({
    baseUrl: args["base-url"],
    protocol: args.protocol,
    httpVersion: args["http-version"],
    binary: args.binary,
  });
  const client = createClient(service, transport);
  const requests = JSON.parse(readFileSync(args.requests ?? 0, "utf8"));
  const results = await callAll(client, method, requests, {}, 1, false);
  finish(results);
}

/** Print the results, then exit: open HTTP/2 sessions would keep the process alive. */
function finish(results) {
  process.stdout.write(JSON.stringify(results) + "\n", () => process.exit(0));
}
