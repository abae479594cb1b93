// Gateway panel: invoke custom-lang through the gateway, and watch its circuit breaker.
import { GatewayService } from "../gen/gateway/v1/gateway_pb";
import type { ConsoleConfig } from "../config";
import { byId, fact, formatMs, h, showError, showPending, showResult, whileBusy } from "../dom";
import { attempt } from "../errors";
import { oncePerClick } from "../idempotency";
import type { Clients } from "../transport";

const HISTORY_LENGTH = 8;

export function mountGatewayPanel(
  clients: Clients,
  config: ConsoleConfig,
  token: () => string | null,
): void {
  const form = byId<HTMLFormElement>("gateway-form");
  const name = byId<HTMLInputElement>("gateway-name");
  const submit = byId<HTMLButtonElement>("gateway-submit");
  const specials = Array.from(byId("gateway-specials").querySelectorAll<HTMLButtonElement>("button"));
  const result = byId("gateway-result");
  const history = byId<HTMLOListElement>("gateway-history");
  const breaker = new BreakerView(config.breakerUrl, config.breakerPollMs, token);
  const controls = [submit, ...specials];

  const invoke = (who: string): void => {
    void whileBusy(controls, async () => {
      const protocol = clients.protocolLabel;
      showPending(result, `Invoking ${who || "World"}…`);
      const gateway = clients.of(GatewayService, config.gatewayBaseUrl);
      const once = oncePerClick();
      const answer = await attempt(() => gateway.invokeCustom({ name: who }, once));
      if (answer.ok) {
        showResult(
          result,
          h("p", { className: "message", id: "gateway-message", text: answer.value.message }),
          h(
            "dl",
            { className: "facts" },
            fact("latency", formatMs(answer.ms), "gateway-latency"),
            fact("protocol", protocol),
          ),
        );
      } else {
        showError(result, answer.error, answer.ms);
      }
      const outcome = answer.ok
        ? h("span", { className: "ok", text: "ok" })
        : h("code", { className: "code", text: answer.error.code });
      history.prepend(
        h("li", {}, h("code", { text: who || "World" }), " → ", outcome, ` · ${formatMs(answer.ms)}`),
      );
      while (history.children.length > HISTORY_LENGTH) {
        history.lastElementChild?.remove();
      }
      // Show at once what this call did to the breaker rather than at the next poll.
      await breaker.refresh();
    });
  };

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    invoke(name.value);
  });
  for (const button of specials) {
    button.addEventListener("click", () => invoke(button.dataset.name ?? ""));
  }
  breaker.start();
}

const BREAKER_STATES: Record<string, string> = {
  closed: "calls pass through to custom-lang",
  open: "failing fast with unavailable, custom-lang is not called",
  half_open: "letting a few trial calls through",
};

/**
 * The gateway's `/debug/breaker`, polled while the page is visible. It carries the logged-in
 * user's token, since a gateway with AUTH_REQUIRED=1 answers 401 without one.
 */
class BreakerView {
  private readonly root = byId("breaker");
  private readonly state = byId("breaker-state");
  private readonly meaning = byId("breaker-meaning");
  private readonly failures = byId("breaker-failures");
  private readonly tokens = byId("breaker-tokens");
  private readonly updated = byId("breaker-updated");
  private timer: ReturnType<typeof setTimeout> | undefined;
  private inFlight: Promise<void> | null = null;

  constructor(
    private readonly url: string,
    private readonly pollMs: number,
    private readonly token: () => string | null,
  ) {}

  start(): void {
    document.addEventListener("visibilitychange", () => this.schedule(0));
    this.schedule(0);
  }

  refresh(): Promise<void> {
    this.inFlight ??= this.fetchState().finally(() => {
      this.inFlight = null;
    });
    return this.inFlight;
  }

  private schedule(delayMs: number): void {
    clearTimeout(this.timer);
    if (document.hidden) {
      return;
    }
    this.timer = setTimeout(() => {
      void this.refresh().then(() => this.schedule(this.pollMs));
    }, delayMs);
  }

  private async fetchState(): Promise<void> {
    try {
      const token = this.token();
      const headers: Record<string, string> = token ? { Authorization: `Bearer ${token}` } : {};
      const response = await fetch(this.url, { cache: "no-store", headers });
      if (response.status === 401) {
        throw new Error(token ? "HTTP 401: the token was refused" : "HTTP 401: log in to see it");
      }
      if (!response.ok) {
        throw new Error(`HTTP ${response.status}`);
      }
      const body = (await response.json()) as Record<string, unknown>;
      const state = typeof body.state === "string" ? body.state : "unknown";
      this.root.dataset.state = state;
      this.state.textContent = state;
      this.meaning.textContent = BREAKER_STATES[state] ?? "";
      this.failures.textContent = count(body.consecutive_failures);
      this.tokens.textContent = count(body.retry_tokens);
      this.updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      this.root.dataset.state = "unreachable";
      this.state.textContent = "unreachable";
      this.meaning.textContent = `${this.url}: ${err instanceof Error ? err.message : String(err)}`;
      this.failures.textContent = "?";
      this.tokens.textContent = "?";
      this.updated.textContent = `tried ${new Date().toLocaleTimeString()}`;
    }
  }
}

/** A number from the breaker's JSON; the retry budget refills continuously, so tokens are fractional. */
function count(value: unknown): string {
  if (typeof value !== "number") {
    return "?";
  }
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}
