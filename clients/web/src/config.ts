// Where the gateway (Envoy, gRPC-Web) is. First match wins:
//   1. `?api=http://127.0.0.1:8080` in the page URL (tests point the app at their Envoy this way);
//   2. `config.json` next to index.html: {"apiBaseUrl": "https://api.example.com"} (deployments);
//   3. port 8080 on the host that served the page.

function checked(url: string): string {
  const u = new URL(url, location.href);
  if (u.protocol !== "http:" && u.protocol !== "https:") throw new Error(`the API URL must be http(s): ${url}`);
  return u.href.replace(/\/+$/, "");
}

export async function apiBaseUrl(): Promise<string> {
  const param = new URLSearchParams(location.search).get("api");
  if (param) return checked(param);
  try {
    const res = await fetch("config.json", { cache: "no-store" });
    if (res.ok) {
      const cfg = (await res.json()) as { apiBaseUrl?: unknown };
      if (typeof cfg.apiBaseUrl === "string" && cfg.apiBaseUrl) return checked(cfg.apiBaseUrl);
    }
  } catch {
    // No config.json (or not JSON): use the default.
  }
  return `${location.protocol}//${location.hostname || "localhost"}:8080`;
}
