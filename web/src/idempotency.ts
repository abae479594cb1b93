// A fresh Idempotency-Key per click: a retry of that click's call (by the browser, a
// proxy or the client library) is answered from the service's stored outcome instead of
// running twice, while the next click is a call of its own. See docs/idempotency.md.
import type { CallOptions } from "@connectrpc/connect";

export function oncePerClick(): CallOptions {
  return { headers: { "Idempotency-Key": newKey() } };
}

function newKey(): string {
  // randomUUID exists only in secure contexts (https, localhost); a console served over
  // plain http elsewhere still sends 128 random bits.
  if (typeof crypto.randomUUID === "function") {
    return crypto.randomUUID();
  }
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
