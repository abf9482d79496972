// The npm @fal-ai/client's share of the soak (tests/soak/soak.py starts it).
// Usage: node js_soak.mjs QUEUE_BASE RUN_BASE SECONDS WEBHOOK_URL APP [APP ...]
// Until SECONDS have passed: fal.subscribe (polling) and fal.queue.submit with a webhook,
// round robin over the apps. Prints one JSON object per line:
//   {"accepted": rid, "app": app, "webhook": bool}   a submit the gateway acknowledged
//   {"done": rid, "ms": n}                           a subscribe that returned its result
//   {"error": "...", "op": "..."}                    a refused or failed call
import { createFalClient } from "@fal-ai/client";

const [queueBase, runBase, seconds, webhookUrl, ...apps] = process.argv.slice(2);
const rewrite = (url) =>
  url.replace("https://queue.fal.run", queueBase).replace("https://fal.run", runBase);
const fal = createFalClient({
  credentials: process.env.FAL_KEY,
  requestMiddleware: async (req) => ({ ...req, url: rewrite(req.url) }),
});
const emit = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const deadline = Date.now() + Number(seconds) * 1000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let n = 0;
while (Date.now() < deadline) {
  const app = apps[n % apps.length];
  n += 1;
  const t0 = Date.now();
  if (n % 2 === 0) {
    try {
      const r = await fal.subscribe(`${app}/test`, {
        input: { js: n },
        pollInterval: 100,
        onEnqueue: (rid) => emit({ accepted: rid, app, webhook: false }),
      });
      emit({ done: r.requestId, ms: Date.now() - t0 });
    } catch (e) {
      emit({ error: String(e?.status ?? "") + " " + String(e?.message ?? e).slice(0, 200), op: "subscribe" });
    }
  } else {
    try {
      const { request_id } = await fal.queue.submit(`${app}/test`, { input: { js: n }, webhookUrl });
      emit({ accepted: request_id, app, webhook: true });
    } catch (e) {
      emit({ error: String(e?.status ?? "") + " " + String(e?.message ?? e).slice(0, 200), op: "submit" });
    }
  }
  await sleep(100);
}
