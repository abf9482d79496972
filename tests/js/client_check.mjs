// Drives the real npm @fal-ai/client against a local fal-sidecar, pointed at it the way
// PROTOCOL.md describes: a requestMiddleware that rewrites fal's hosts to local URLs.
// Usage: node client_check.mjs QUEUE_BASE RUN_BASE   (prints one JSON object)
// Env: FAL_APP (the app id, default me/js-app), FAL_KEY (credentials, default a dummy).
import { createFalClient } from "@fal-ai/client";

const [queueBase, runBase] = process.argv.slice(2);
const rewrite = (url) =>
  url.replace("https://queue.fal.run", queueBase).replace("https://fal.run", runBase);
const fal = createFalClient({
  credentials: process.env.FAL_KEY || "e2e-key-id:e2e-key-secret",
  requestMiddleware: async (req) => ({ ...req, url: rewrite(req.url) }),
});
const app = process.env.FAL_APP || "me/js-app";
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const out = {};

// subscribe (polling) with logs
const logs = [];
const statuses = new Set();
const polled = await fal.subscribe(`${app}/logs`, {
  input: { lines: 3 },
  logs: true,
  pollInterval: 100,
  onQueueUpdate: (u) => {
    statuses.add(u.status);
    for (const l of u.logs ?? []) logs.push(l.message);
  },
});
out.polling = { data: polled.data, requestId: polled.requestId, logs, statuses: [...statuses] };

// subscribe in streaming mode (the status SSE stream)
const streamed = await fal.subscribe(`${app}/test`, { input: { x: 1 }, mode: "streaming" });
out.streaming = streamed.data;

// submit, status, result
const { request_id } = await fal.queue.submit(`${app}/echo`, { input: { y: 2 } });
let status;
for (let i = 0; i < 200; i++) {
  status = await fal.queue.status(app, { requestId: request_id, logs: true });
  if (status.status === "COMPLETED") break;
  await sleep(50);
}
out.status = status.status;
out.result = (await fal.queue.result(app, { requestId: request_id })).data;

// Idempotency-Key as a custom submit header: retries name the first request
const idem = { "Idempotency-Key": `js-${Date.now()}-${Math.random()}` };
const firstSubmit = await fal.queue.submit(`${app}/echo`, { input: { k: 1 }, headers: idem });
const retried = await fal.queue.submit(`${app}/echo`, { input: { k: 1 }, headers: idem });
out.idempotency = [firstSubmit.request_id, retried.request_id];

// cancel a running request
const slow = await fal.queue.submit(`${app}/slow`, { input: { seconds: 10 } });
for (let i = 0; i < 200; i++) {
  const s = await fal.queue.status(app, { requestId: slow.request_id });
  if (s.status === "IN_PROGRESS") break;
  await sleep(50);
}
await fal.queue.cancel(app, { requestId: slow.request_id });
let cancelled;
for (let i = 0; i < 200; i++) {
  cancelled = await fal.queue.status(app, { requestId: slow.request_id });
  if (cancelled.status === "COMPLETED") break;
  await sleep(50);
}
out.cancelled = cancelled;

// synchronous run through the run host
out.run = (await fal.run(`${app}/test`, { input: { z: 3 } })).data;

console.log(JSON.stringify(out));
