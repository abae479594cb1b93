// Call one unary method of a running service with connect-node, an independent Connect
// client, and print what each call returned as one JSON array on stdout.
//
//   node call.mjs --descriptor-set FILE --service pkg.v1.Service --method Name \
//     --base-url http://127.0.0.1:PORT [--protocol connect|grpc|grpcweb] \
//     [--http-version 1.1|2] [--binary] [--requests FILE]
//
// FILE (or stdin) holds a JSON array of request messages in their proto JSON form; they are sent one
// after another on one transport (so over HTTP/1.1 they share a keep-alive pool). The
// schema comes from a FileDescriptorSet (`buf build -o FILE`), so no generated code is needed.
// Each result is {"ok": true, "response": {...}} or {"ok": false, "code": "snake_case",
// "message": "..."}.

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { createFileRegistry, fromBinary, fromJson, toJson } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
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
  },
});

for (const required of ["descriptor-set", "service", "method", "base-url"]) {
  if (!args[required]) {
    console.error(`call.mjs: --${required} is required`);
    process.exit(2);
  }
}

const registry = createFileRegistry(
  fromBinary(FileDescriptorSetSchema, readFileSync(args["descriptor-set"])),
);
const service = registry.getService(args.service);
if (!service) {
  console.error(`call.mjs: no service ${args.service} in the descriptor set`);
  process.exit(2);
}
const method = service.methods.find((m) => m.name === args.method);
if (!method || method.methodKind !== "unary") {
  console.error(`call.mjs: no unary method ${args.method} in ${args.service}`);
  process.exit(2);
}

const transports = {
  connect: createConnectTransport,
  grpc: createGrpcTransport,
  grpcweb: createGrpcWebTransport,
};
const makeTransport = transports[args.protocol];
if (!makeTransport) {
  console.error(`call.mjs: --protocol must be one of ${Object.keys(transports).join(", ")}`);
  process.exit(2);
}
const transport = makeTransport({
  baseUrl: args["base-url"],
  httpVersion: args["http-version"],
  useBinaryFormat: args.binary,
});
const client = createClient(service, transport);

/** `ResourceExhausted` -> `resource_exhausted`, the Connect protocol's spelling. */
function codeName(code) {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
}

const requests = JSON.parse(readFileSync(args.requests ?? 0, "utf8"));
const results = [];
for (const json of requests) {
  try {
    const response = await client[method.localName](fromJson(method.input, json));
    results.push({ ok: true, response: toJson(method.output, response) });
  } catch (err) {
    const error = ConnectError.from(err);
    results.push({ ok: false, code: codeName(error.code), message: error.rawMessage });
  }
}
process.stdout.write(JSON.stringify(results) + "\n");
