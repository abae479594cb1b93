// Where the console finds the services: the web service's runtime config.

/** The service endpoints as the browser reaches them. */
export interface ConsoleConfig {
  greeterBaseUrl: string;
  gatewayBaseUrl: string;
  authBaseUrl: string;
  breakerUrl: string;
  breakerPollMs: number;
}

/** Every service on this page's own origin: what a reverse proxy in front gives. */
export function sameOriginConfig(origin: string = window.location.origin): ConsoleConfig {
  return {
    greeterBaseUrl: origin,
    gatewayBaseUrl: origin,
    authBaseUrl: origin,
    breakerUrl: `${origin}/debug/breaker`,
    breakerPollMs: 1000,
  };
}

/** Reads `config.json` beside the page; empty values mean this page's origin. */
export async function loadConfig(): Promise<ConsoleConfig> {
  const response = await fetch("config.json", { cache: "no-store" });
  if (!response.ok) {
    throw new Error(`config.json answered HTTP ${response.status}`);
  }
  const raw: unknown = await response.json();
  if (typeof raw !== "object" || raw === null) {
    throw new Error("config.json is not a JSON object");
  }
  const fields = raw as Record<string, unknown>;
  const defaults = sameOriginConfig();
  const gatewayBaseUrl = url(fields.gatewayBaseUrl, defaults.gatewayBaseUrl);
  return {
    greeterBaseUrl: url(fields.greeterBaseUrl, defaults.greeterBaseUrl),
    gatewayBaseUrl,
    authBaseUrl: url(fields.authBaseUrl, defaults.authBaseUrl),
    breakerUrl: url(fields.breakerUrl, `${gatewayBaseUrl}/debug/breaker`),
    breakerPollMs:
      typeof fields.breakerPollMs === "number" && fields.breakerPollMs > 0
        ? fields.breakerPollMs
        : defaults.breakerPollMs,
  };
}

function url(value: unknown, fallback: string): string {
  if (typeof value !== "string" || value.trim() === "") {
    return fallback;
  }
  // Relative values ("/api") are taken against this page, like a link would be.
  return new URL(value.trim(), window.location.href).href.replace(/\/+$/, "");
}
