// A tiny static server for the built app (dist/), for `make web` and local use. No dependencies.
//
//   node scripts/serve.mjs [--host 127.0.0.1] [--port 5173] [--dir dist] [--api http://127.0.0.1:8080]
//
// --api (or $EVERYTHING_API_URL) is served as /config.json, which the app reads to find the
// gateway; a `?api=` query parameter in the page URL still wins.
import { createReadStream, existsSync, statSync } from "node:fs";
import { createServer } from "node:http";
import { dirname, extname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const web = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const { values } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "5173" },
    dir: { type: "string", default: join(web, "dist") },
    api: { type: "string", default: process.env.EVERYTHING_API_URL ?? "" },
  },
});
const dir = resolve(values.dir);
if (!existsSync(join(dir, "index.html"))) {
  console.error(`${dir}/index.html is missing: run \`npm run build\` first`);
  process.exit(2);
}

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon",
  ".map": "application/json",
};

const server = createServer((req, res) => {
  const url = new URL(req.url ?? "/", "http://localhost");
  if (req.method !== "GET" && req.method !== "HEAD") {
    res.writeHead(405, { allow: "GET, HEAD" }).end();
    return;
  }
  if (url.pathname === "/config.json" && values.api) {
    res.writeHead(200, { "content-type": TYPES[".json"], "cache-control": "no-store" });
    res.end(JSON.stringify({ apiBaseUrl: values.api }));
    return;
  }
  let path = normalize(join(dir, decodeURIComponent(url.pathname)));
  if (path !== dir && !path.startsWith(dir + sep)) {
    res.writeHead(403).end();
    return;
  }
  if (!existsSync(path) || statSync(path).isDirectory()) path = join(dir, "index.html"); // the SPA's routes
  const immutable = path.includes(`${sep}assets${sep}`);
  res.writeHead(200, {
    "content-type": TYPES[extname(path)] ?? "application/octet-stream",
    "cache-control": immutable ? "public, max-age=31536000, immutable" : "no-cache",
    "x-content-type-options": "nosniff",
  });
  if (req.method === "HEAD") res.end();
  else createReadStream(path).pipe(res);
});
server.listen(Number(values.port), values.host, () => {
  const { port } = server.address();
  console.log(`serving ${dir} on http://${values.host}:${port}/${values.api ? ` (API ${values.api})` : ""}`);
});
