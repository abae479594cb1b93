// The locales greeter.v2 speaks; the server refuses any other with invalid_argument.
import { h } from "../dom";

export const LOCALES: ReadonlyArray<[code: string, label: string]> = [
  ["en", "English"],
  ["ja", "日本語"],
  ["fr", "Français"],
  ["es", "Español"],
  ["de", "Deutsch"],
];

/** Fills a `<select>` with the known locales, English first. */
export function fillLocales(select: HTMLSelectElement): void {
  select.replaceChildren(
    ...LOCALES.map(([code, label]) => {
      const option = h("option", { text: `${label} (${code})` });
      option.value = code;
      return option;
    }),
  );
}
