// Verify one QStash delivery with the official JS SDK's Receiver (@upstash/qstash from /work/main/node_modules).
//
// Reads one JSON object on stdin (keys stay out of the process list):
//   {"signature": "...", "body": "<raw body as text>", "url": "<delivery url or null>",
//    "currentSigningKey": "sig_...", "nextSigningKey": "sig_..."}
// Prints {"ok": true} and exits 0 when the signature verifies; prints {"ok": false, "error": "..."} and exits 1
// otherwise; exits 2 on bad input.
import { Receiver } from "@upstash/qstash";

let raw = "";
for await (const chunk of process.stdin) raw += chunk;
let input;
try {
  input = JSON.parse(raw);
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: `stdin is not JSON: ${e.message}` }));
  process.exit(2);
}
const receiver = new Receiver({
  currentSigningKey: input.currentSigningKey,
  nextSigningKey: input.nextSigningKey,
});
try {
  const ok = await receiver.verify({
    signature: input.signature,
    body: input.body,
    url: input.url ?? undefined,
  });
  console.log(JSON.stringify({ ok }));
  process.exit(ok ? 0 : 1);
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: String(e && e.message ? e.message : e) }));
  process.exit(1);
}
