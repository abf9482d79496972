// Drives the real npm @fal-ai/client realtime API against a local gateway. The client
// hard-codes wss://fal.run and https://rest.fal.ai: the token request goes through
// `requestMiddleware` (rewritten to the run base), and the WebSocket through a global
// WebSocket that rewrites its URL (Node 20 needs --experimental-websocket).
// Usage: node --experimental-websocket realtime_check.mjs RUN_BASE APP   (prints one JSON)
// Env: FAL_KEY.
import { createFalClient } from "@fal-ai/client";

const [runBase, app] = process.argv.slice(2);
const wsBase = runBase.replace("http://", "ws://");
const Native = globalThis.WebSocket;
const urls = [];
globalThis.WebSocket = class extends Native {
  constructor(url, protocols) {
    const local = String(url).replace("wss://fal.run", wsBase);
    urls.push(local.replace(/fal_jwt_token=[^&]+/, "fal_jwt_token=…"));
    super(local, protocols);
  }
};
const fal = createFalClient({
  credentials: process.env.FAL_KEY,
  requestMiddleware: async (req) => ({ ...req, url: req.url.replace("https://rest.fal.ai", runBase) }),
});
const results = [];
const done = new Promise((resolve, reject) => {
  const conn = fal.realtime.connect(app, {
    throttleInterval: 0,
    onResult: (r) => {
      results.push(r);
      if (results.length === 3) {
        conn.close();
        resolve();
      } else {
        conn.send({ prompt: `p${results.length}` });
      }
    },
    onError: (e) => reject(new Error(`realtime error: ${e.message} (${e.status})`)),
  });
  conn.send({ prompt: "p0" });
});
const timer = setTimeout(() => {
  console.error("timed out");
  process.exit(2);
}, 60000);
await done;
clearTimeout(timer);
console.log(JSON.stringify({ results, urls }));
process.exit(0);
