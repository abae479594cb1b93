// Every failed call is shown as its Connect code and message, never as a blank panel.
import { Code, ConnectError } from "@connectrpc/connect";

/** A failed call as the console shows it. */
export interface CallError {
  /** The Connect code as written on the wire, e.g. "not_found". */
  code: string;
  message: string;
}

/** "NotFound" → "not_found", the spelling of the Connect protocol and of `buf curl`. */
export function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
}

/** Any thrown value as a Connect code and a message a person can act on. */
export function callError(err: unknown): CallError {
  const error = ConnectError.from(err);
  let message = error.rawMessage || "(no message)";
  if (error.code === Code.Unknown && /fetch|network|load failed/i.test(message)) {
    // What the browser reports when a service is down or refuses this origin.
    message +=
      ` (is the service running, and does its CORS_ALLOWED_ORIGINS include` +
      ` ${window.location.origin}?)`;
  }
  return { code: codeName(error.code), message };
}

/** How a call ended, with its latency measured in the browser (network and codec included). */
export type Outcome<T> =
  | { ok: true; value: T; ms: number }
  | { ok: false; error: CallError; ms: number };

/** Runs `call`, never throwing: a failure becomes its Connect code and message. */
export async function attempt<T>(call: () => Promise<T>): Promise<Outcome<T>> {
  const started = performance.now();
  try {
    const value = await call();
    return { ok: true, value, ms: performance.now() - started };
  } catch (err) {
    return { ok: false, error: callError(err), ms: performance.now() - started };
  }
}
