// Small DOM helpers; server data only ever reaches the page as text, never as HTML.
import type { CallError } from "./errors";

/** The element with this id; a missing one is a bug in index.html, so fail loudly. */
export function byId<T extends HTMLElement = HTMLElement>(id: string): T {
  const element = document.getElementById(id);
  if (!element) {
    throw new Error(`index.html has no element #${id}`);
  }
  return element as T;
}

interface Props {
  id?: string;
  className?: string;
  text?: string;
  title?: string;
}

/** An element with text and children. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Props = {},
  ...children: Array<Node | string>
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  if (props.id) element.id = props.id;
  if (props.className) element.className = props.className;
  if (props.title) element.title = props.title;
  if (props.text !== undefined) element.textContent = props.text;
  element.append(...children);
  return element;
}

/** One labelled value of a result, as a `<div><dt/><dd/></div>` inside a `<dl>`. */
export function fact(label: string, value: string, id?: string): HTMLDivElement {
  return h("div", {}, h("dt", { text: label }), h("dd", { id, text: value }));
}

/** A result area while its call is under way. */
export function showPending(target: HTMLElement, text: string): void {
  target.dataset.state = "pending";
  target.setAttribute("aria-busy", "true");
  target.replaceChildren(h("p", { className: "muted", text }));
}

/** A result area with an answer. */
export function showResult(target: HTMLElement, ...children: Node[]): void {
  target.dataset.state = "ok";
  target.removeAttribute("aria-busy");
  target.replaceChildren(...children);
}

/** A result area with a failed call: its Connect code and message. */
export function showError(target: HTMLElement, error: CallError, latencyMs?: number): void {
  target.dataset.state = "error";
  target.removeAttribute("aria-busy");
  const line = h(
    "p",
    { className: "error" },
    h("code", { className: "code", text: error.code }),
    " ",
    h("span", { className: "message", text: error.message }),
  );
  target.replaceChildren(line);
  if (latencyMs !== undefined) {
    target.append(h("p", { className: "muted", text: `after ${formatMs(latencyMs)}` }));
  }
}

export function formatMs(ms: number): string {
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
}

/** Disables `controls` while `work` runs, so each answer belongs to the press that asked. */
export async function whileBusy(controls: HTMLElement[], work: () => Promise<void>): Promise<void> {
  for (const control of controls) control.setAttribute("disabled", "");
  try {
    await work();
  } finally {
    for (const control of controls) control.removeAttribute("disabled");
  }
}
