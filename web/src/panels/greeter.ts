// Greeter panel: name → greeting, with what the external API answered and the latency.
import { GreeterService } from "../gen/greeter/v1/greeter_pb";
import type { ConsoleConfig } from "../config";
import { byId, fact, formatMs, h, showError, showPending, showResult, whileBusy } from "../dom";
import { attempt } from "../errors";
import { oncePerClick } from "../idempotency";
import type { Clients } from "../transport";

export function mountGreeterPanel(clients: Clients, config: ConsoleConfig): void {
  const form = byId<HTMLFormElement>("greeter-form");
  const name = byId<HTMLInputElement>("greeter-name");
  const submit = byId<HTMLButtonElement>("greeter-submit");
  const result = byId("greeter-result");

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    void whileBusy([submit], async () => {
      const protocol = clients.protocolLabel;
      showPending(result, "Greeting…");
      const greeter = clients.of(GreeterService, config.greeterBaseUrl);
      const once = oncePerClick();
      const answer = await attempt(() => greeter.greet({ name: name.value }, once));
      if (!answer.ok) {
        showError(result, answer.error, answer.ms);
        return;
      }
      const greeting = answer.value;
      showResult(
        result,
        h("p", { className: "message", id: "greeter-message", text: greeting.message }),
        h(
          "dl",
          { className: "facts" },
          fact("external status", String(greeting.externalStatus), "greeter-external-status"),
          fact("body length", `${greeting.externalBodyLength} bytes`, "greeter-body-length"),
          fact("latency", formatMs(answer.ms), "greeter-latency"),
          fact("protocol", protocol, "greeter-protocol"),
        ),
      );
    });
  });
}
