// The microapp console: its panels talking to the services with Connect-web.
import { type ConsoleConfig, loadConfig, sameOriginConfig } from "./config";
import { byId, fact, h } from "./dom";
import { mountAuthPanel } from "./panels/auth";
import { mountGatewayPanel } from "./panels/gateway";
import { mountGreeterPanel } from "./panels/greeter";
import { mountGreeterStreamPanel } from "./panels/greeterStream";
import { mountGreeterV2Panel } from "./panels/greeterV2";
import { browserStorage, SessionStore } from "./session";
import { Clients, isProtocol, type Protocol } from "./transport";

const PROTOCOL_KEY = "microapp.protocol";

async function main(): Promise<void> {
  const storage = browserStorage();
  const status = byId("config-status");
  let config: ConsoleConfig;
  try {
    config = await loadConfig();
    status.dataset.state = "ok";
    status.replaceChildren();
  } catch (err) {
    config = sameOriginConfig();
    status.dataset.state = "error";
    const reason = err instanceof Error ? err.message : String(err);
    status.textContent = `Could not load config.json (${reason}); using this page's origin for every service.`;
  }
  showEndpoints(config);

  const select = byId<HTMLSelectElement>("protocol");
  const wanted = new URLSearchParams(window.location.search).get("protocol");
  const saved = storage?.getItem(PROTOCOL_KEY);
  select.value = isProtocol(wanted) ? wanted : isProtocol(saved) ? saved : "connect-json";
  select.addEventListener("change", () => storage?.setItem(PROTOCOL_KEY, select.value));

  const session = new SessionStore(storage);
  const clients = new Clients(
    () => (isProtocol(select.value) ? select.value : ("connect-json" satisfies Protocol)),
    () => session.token,
  );
  mountAuthPanel(clients, config, session);
  mountGreeterPanel(clients, config);
  mountGreeterV2Panel(clients, config);
  mountGreeterStreamPanel(clients, config);
  mountGatewayPanel(clients, config, () => session.token);
  document.body.dataset.ready = "true";
}

function showEndpoints(config: ConsoleConfig): void {
  byId("endpoints").replaceChildren(
    fact("auth", config.authBaseUrl),
    fact("greeter", config.greeterBaseUrl),
    fact("gateway", config.gatewayBaseUrl),
    fact("breaker", config.breakerUrl),
  );
}

main().catch((err: unknown) => {
  // Never a blank page: whatever broke is said where a person looks first.
  const message = err instanceof Error ? err.message : String(err);
  document.body.prepend(h("p", { className: "fatal error", text: `Console failed to start: ${message}` }));
});
