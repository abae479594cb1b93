// The logged-in user: the JWT from auth, kept across reloads and sent as Bearer.

/** Who is logged in, as the console keeps it. */
export interface Session {
  token: string;
  email: string;
  userId: string;
  role: string;
  /** Expiry of the token in milliseconds since the epoch, when it carries one. */
  expiresAt: number | null;
}

/** The claims of a JWT the console reads to show who is logged in. */
export interface TokenClaims {
  sub?: string;
  role?: string;
  exp?: number;
}

const STORAGE_KEY = "microapp.session";

/** Reads a JWT's payload without checking it: the services check it, the console only shows it. */
export function tokenClaims(token: string): TokenClaims {
  const payload = token.split(".")[1];
  if (!payload) {
    return {};
  }
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const json = new TextDecoder().decode(
      Uint8Array.from(atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, "=")), (c) =>
        c.charCodeAt(0),
      ),
    );
    const claims: unknown = JSON.parse(json);
    return typeof claims === "object" && claims !== null ? (claims as TokenClaims) : {};
  } catch {
    return {};
  }
}

/** The current session, stored in localStorage so a reload stays logged in. */
export class SessionStore {
  private current: Session | null;
  private readonly listeners: Array<(session: Session | null) => void> = [];

  constructor(private readonly storage: Storage | null) {
    this.current = this.load();
  }

  get session(): Session | null {
    if (this.current?.expiresAt != null && this.current.expiresAt <= Date.now()) {
      this.clear();
    }
    return this.current;
  }

  /** The bearer token for the next call, if someone is logged in. */
  get token(): string | null {
    return this.session?.token ?? null;
  }

  set(session: Session): void {
    this.current = session;
    this.storage?.setItem(STORAGE_KEY, JSON.stringify(session));
    this.notify();
  }

  clear(): void {
    this.current = null;
    this.storage?.removeItem(STORAGE_KEY);
    this.notify();
  }

  onChange(listener: (session: Session | null) => void): void {
    this.listeners.push(listener);
  }

  private notify(): void {
    for (const listener of this.listeners) {
      listener(this.current);
    }
  }

  private load(): Session | null {
    const raw = this.storage?.getItem(STORAGE_KEY);
    if (!raw) {
      return null;
    }
    try {
      const value = JSON.parse(raw) as Partial<Session>;
      if (typeof value.token !== "string" || typeof value.email !== "string") {
        return null;
      }
      const session: Session = {
        token: value.token,
        email: value.email,
        userId: typeof value.userId === "string" ? value.userId : "",
        role: typeof value.role === "string" ? value.role : "",
        expiresAt: typeof value.expiresAt === "number" ? value.expiresAt : null,
      };
      return session.expiresAt != null && session.expiresAt <= Date.now() ? null : session;
    } catch {
      return null;
    }
  }
}

/** localStorage, or nothing where the browser refuses it (private modes, sandboxed frames). */
export function browserStorage(): Storage | null {
  try {
    const storage = window.localStorage;
    storage.getItem(STORAGE_KEY);
    return storage;
  } catch {
    return null;
  }
}
