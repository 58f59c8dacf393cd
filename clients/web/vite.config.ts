import { defineConfig } from "vite";

// base "./" makes dist/ relocatable: any static server, any path prefix.
export default defineConfig({
  base: "./",
  build: { target: "es2022", sourcemap: true, outDir: "dist", emptyOutDir: true },
  server: { host: "127.0.0.1", port: 5173, strictPort: true },
  preview: { host: "127.0.0.1", port: 5173, strictPort: true },
});
