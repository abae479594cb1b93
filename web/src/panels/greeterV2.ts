// Greeter v2 panel: name and locale → the greeting, what the external API answered, the trace id.
import { GreeterService } from "../gen/greeter/v2/greeter_pb";
import type { ConsoleConfig } from "../config";
import { byId, fact, formatMs, h, showError, showPending, showResult, whileBusy } from "../dom";
import { attempt } from "../errors";
import { oncePerClick } from "../idempotency";
import type { Clients } from "../transport";
import { fillLocales } from "./locales";

export function mountGreeterV2Panel(clients: Clients, config: ConsoleConfig): void {
  const form = byId<HTMLFormElement>("greeter-v2-form");
  const name = byId<HTMLInputElement>("greeter-v2-name");
  const locale = byId<HTMLSelectElement>("greeter-v2-locale");
  const submit = byId<HTMLButtonElement>("greeter-v2-submit");
  const result = byId("greeter-v2-result");
  fillLocales(locale);

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    void whileBusy([submit], async () => {
      const protocol = clients.protocolLabel;
      showPending(result, "Greeting…");
      const greeter = clients.of(GreeterService, config.greeterBaseUrl);
      const once = oncePerClick();
      const answer = await attempt(() =>
        greeter.greet({ name: name.value, locale: locale.value }, once),
      );
      if (!answer.ok) {
        showError(result, answer.error, answer.ms);
        return;
      }
      const greeting = answer.value;
      showResult(
        result,
        h("p", { className: "message", id: "greeter-v2-message", text: greeting.message }),
        h(
          "dl",
          { className: "facts" },
          fact("external status", String(greeting.externalStatus), "greeter-v2-external-status"),
          fact("body length", `${greeting.externalBodyLength} bytes`, "greeter-v2-body-length"),
          fact("latency", formatMs(answer.ms), "greeter-v2-latency"),
          fact("protocol", protocol, "greeter-v2-protocol"),
          // Empty when the greeter exports no traces (OTEL_EXPORTER_OTLP_ENDPOINT unset).
          fact("trace id", greeting.traceId || "(tracing off)", "greeter-v2-trace-id"),
        ),
      );
    });
  });
}
