// Streaming panel: greeter.v2 GreetStream, each greeting shown as it arrives, with Cancel.
import { Code, ConnectError } from "@connectrpc/connect";
import { GreeterService } from "../gen/greeter/v2/greeter_pb";
import type { ConsoleConfig } from "../config";
import { byId, formatMs, h, showError } from "../dom";
import { callError } from "../errors";
import { CALL_TIMEOUT_MS, type Clients } from "../transport";
import { fillLocales } from "./locales";

export function mountGreeterStreamPanel(clients: Clients, config: ConsoleConfig): void {
  const form = byId<HTMLFormElement>("stream-form");
  const name = byId<HTMLInputElement>("stream-name");
  const locale = byId<HTMLSelectElement>("stream-locale");
  const count = byId<HTMLInputElement>("stream-count");
  const interval = byId<HTMLInputElement>("stream-interval");
  const start = byId<HTMLButtonElement>("stream-start");
  const cancel = byId<HTMLButtonElement>("stream-cancel");
  const status = byId("stream-status");
  const messages = byId<HTMLOListElement>("stream-messages");
  fillLocales(locale);

  // The call under way, if any: Cancel aborts it, which closes the stream to the server.
  let running: AbortController | null = null;
  cancel.addEventListener("click", () => running?.abort());

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (running) return;
    const controller = new AbortController();
    running = controller;
    start.disabled = true;
    cancel.disabled = false;
    void stream(controller.signal).finally(() => {
      running = null;
      start.disabled = false;
      cancel.disabled = true;
    });
  });

  async function stream(signal: AbortSignal): Promise<void> {
    const wanted = Number(count.value) || 0;
    const intervalMs = Number(interval.value) || 0;
    const protocol = clients.protocolLabel;
    const greeter = clients.of(GreeterService, config.greeterBaseUrl);
    messages.replaceChildren();
    setStatus("streaming", `Streaming over ${protocol}…`);
    const started = performance.now();
    let received = 0;
    try {
      const responses = greeter.greetStream(
        { name: name.value, locale: locale.value, count: wanted, intervalMs },
        // Long enough for the whole stream; a stalled one still ends as deadline_exceeded.
        { signal, timeoutMs: (wanted || 5) * intervalMs + CALL_TIMEOUT_MS },
      );
      for await (const response of responses) {
        received += 1;
        const item = h(
          "li",
          {},
          h("span", { className: "sequence", text: `#${response.sequence}` }),
          " ",
          h("span", { className: "message", text: response.message }),
        );
        item.dataset.sequence = String(response.sequence);
        messages.append(item);
        setStatus("streaming", `${received} received over ${protocol}…`);
      }
      const took = formatMs(performance.now() - started);
      setStatus("done", `Done: ${received} messages in ${took} over ${protocol}.`);
    } catch (err) {
      if (signal.aborted && ConnectError.from(err).code === Code.Canceled) {
        setStatus("cancelled", `Cancelled after ${received} messages.`);
        return;
      }
      showError(status, callError(err), performance.now() - started);
    }
  }

  function setStatus(state: string, text: string): void {
    status.dataset.state = state;
    status.replaceChildren(h("p", { id: "stream-status-text", text }));
  }
}
