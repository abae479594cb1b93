// Auth panel: register, log in, show who is logged in; the token then rides on every call.
import { AuthService } from "../gen/auth/v1/auth_pb";
import type { ConsoleConfig } from "../config";
import { byId, fact, formatMs, h, showError, showPending, showResult, whileBusy } from "../dom";
import { attempt } from "../errors";
import { oncePerClick } from "../idempotency";
import { type Session, type SessionStore, tokenClaims } from "../session";
import type { Clients } from "../transport";

export function mountAuthPanel(clients: Clients, config: ConsoleConfig, store: SessionStore): void {
  const form = byId<HTMLFormElement>("auth-form");
  const email = byId<HTMLInputElement>("auth-email");
  const password = byId<HTMLInputElement>("auth-password");
  const login = byId<HTMLButtonElement>("auth-login");
  const register = byId<HTMLButtonElement>("auth-register");
  const logout = byId<HTMLButtonElement>("auth-logout");
  const who = byId("auth-who");
  const result = byId("auth-result");
  const controls = [login, register, logout];
  const auth = () => clients.of(AuthService, config.authBaseUrl);

  const renderWho = (session: Session | null): void => {
    logout.hidden = session === null;
    if (session === null) {
      who.dataset.state = "anonymous";
      who.replaceChildren(h("p", { text: "Not logged in: calls go without a token." }));
      return;
    }
    who.dataset.state = "logged-in";
    const facts = h("dl", { className: "facts" }, fact("role", session.role || "?", "auth-role"));
    facts.append(fact("user id", session.userId || "?", "auth-user-id"));
    if (session.expiresAt !== null) {
      facts.append(fact("token expires", new Date(session.expiresAt).toLocaleString()));
    }
    who.replaceChildren(
      h("p", {}, "Logged in as ", h("strong", { id: "auth-email-shown", text: session.email })),
      facts,
      h("p", { className: "muted", text: "Greeter and gateway calls carry the token as Bearer." }),
    );
  };
  renderWho(store.session);
  store.onChange(renderWho);

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    void whileBusy(controls, async () => {
      showPending(result, "Logging in…");
      const address = email.value.trim();
      const answer = await attempt(() => auth().login({ email: address, password: password.value }));
      if (!answer.ok) {
        showError(result, answer.error, answer.ms);
        return;
      }
      const token = answer.value.token;
      const claims = tokenClaims(token);
      // Ask auth whose token this is, so the panel shows what the services will see.
      const verified = await attempt(() => auth().verify({ token }));
      store.set({
        token,
        email: address,
        userId: verified.ok ? verified.value.userId : (claims.sub ?? ""),
        role: verified.ok ? verified.value.role : (claims.role ?? ""),
        expiresAt: typeof claims.exp === "number" ? claims.exp * 1000 : null,
      });
      password.value = "";
      const done = h("p", { text: `Logged in (${formatMs(answer.ms)}).` });
      showResult(result, done);
      if (!verified.ok) {
        result.append(
          h(
            "p",
            { className: "error" },
            "Verify failed: ",
            h("code", { className: "code", text: verified.error.code }),
            " ",
            h("span", { className: "message", text: verified.error.message }),
          ),
        );
      }
    });
  });

  register.addEventListener("click", () => {
    void whileBusy(controls, async () => {
      showPending(result, "Registering…");
      const once = oncePerClick();
      const answer = await attempt(() =>
        auth().register({ email: email.value.trim(), password: password.value }, once),
      );
      if (!answer.ok) {
        showError(result, answer.error, answer.ms);
        return;
      }
      const user = answer.value;
      showResult(
        result,
        h("p", { id: "auth-registered" }, "Registered ", h("strong", { text: user.email }), "."),
        h("dl", { className: "facts" }, fact("role", user.role), fact("user id", user.id)),
        h("p", { className: "muted", text: "Log in to get a token." }),
      );
    });
  });

  logout.addEventListener("click", () => {
    store.clear();
    showResult(result, h("p", { text: "Logged out." }));
  });
}
