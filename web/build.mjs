// Bundles the console into the Python package, so serving it needs no Node.js.
// `make web` runs `npm ci`, `buf generate --template buf.gen.web.yaml`, then this.
import { build } from "esbuild";
import { fileURLToPath } from "node:url";

// CONSOLE_OUTFILE lets the freshness test build elsewhere and compare with the committed bundle.
const outfile =
  process.env.CONSOLE_OUTFILE ||
  fileURLToPath(new URL("../src/microapp/web/assets/console.js", import.meta.url));

await build({
  entryPoints: [fileURLToPath(new URL("src/main.ts", import.meta.url))],
  outfile,
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022"],
  minify: true,
  // The committed bundle must not change unless the sources do.
  sourcemap: false,
  legalComments: "none",
  charset: "utf8",
  logLevel: "info",
});
