// Regenerates the TypeScript code for proto/ into src/gen (committed), or checks it (--check).
//
//   npm run generate     # buf generate with buf.gen.yaml (protoc-gen-es, target=ts)
//   npm run check-gen    # exit 1 when src/gen differs from what the protos generate
//
// buf comes from the repo root's package.json (`npm ci` at the root, or `make setup`); the
// google/api protos come from `python proto/generate.py --prepare-includes` (run here when
// .build/include is missing). Versions are pinned in package-lock.json, so the output is stable.
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, cpSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const web = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const root = resolve(web, "../..");
const gen = join(web, "src", "gen");
const check = process.argv.includes("--check");

function prepareIncludes() {
  if (existsSync(join(root, ".build/include/google/api/annotations.proto"))) return;
  const venvPython = join(root, ".venv/bin/python");
  const python = existsSync(venvPython) ? venvPython : "python3";
  execFileSync(python, [join(root, "proto/generate.py"), "--prepare-includes"], { stdio: "inherit" });
}

function files(dir) {
  if (!existsSync(dir)) return [];
  const out = [];
  const walk = (d) => {
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else out.push(relative(dir, p));
    }
  };
  walk(dir);
  return out.sort();
}

const buf = join(root, "node_modules/.bin/buf");
if (!existsSync(buf)) {
  console.error(`buf is missing (${relative(web, buf)}): run \`npm ci\` at the repo root (or \`make setup\`)`);
  process.exit(2);
}
prepareIncludes();

const tmp = mkdtempSync(join(tmpdir(), "everything-web-gen-"));
try {
  execFileSync(buf, ["generate", "--template", "buf.gen.yaml", "--output", tmp], { cwd: web, stdio: "inherit" });
  const fresh = join(tmp, "src", "gen");
  const want = files(fresh);
  const have = files(gen);
  if (check) {
    const drift = [...new Set([...want, ...have])]
      .filter((f) => !want.includes(f) || !have.includes(f) || !readFileSync(join(fresh, f)).equals(readFileSync(join(gen, f))))
      .sort();
    if (drift.length) {
      console.error("generated TypeScript is out of date; run `npm run generate` in clients/web:");
      for (const f of drift) console.error(`  src/gen/${f}`);
      process.exit(1);
    }
    console.log(`generated TypeScript is up to date (${want.length} files)`);
  } else {
    rmSync(gen, { recursive: true, force: true });
    cpSync(fresh, gen, { recursive: true });
    console.log(`generated ${want.length} files into ${relative(root, gen)}`);
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
