// Node producer for the parity tests: adds follow-up jobs the way the TypeScript app does.
// usage: node bullmq_produce.mjs REDIS_URL < jobs.json   (jobs: [{name, data, opts}])
// prints one JSON array: [{id, timestamp, delay}] in input order.
import { Queue } from 'bullmq';
import IORedis from 'ioredis';

const [url] = process.argv.slice(2);
const input = JSON.parse(await new Promise((resolve) => {
  let buf = '';
  process.stdin.on('data', (c) => { buf += c; });
  process.stdin.on('end', () => resolve(buf));
}));
const connection = new IORedis(url, { maxRetriesPerRequest: null });
// The PRD's queue defaults, as the existing Node producers set them.
const queue = new Queue('followup', {
  connection,
  defaultJobOptions: { attempts: 3, backoff: { type: 'exponential', delay: 5000 } },
});
const out = [];
for (const { name, data, opts } of input) {
  const job = await queue.add(name, data, opts || {});
  out.push({ id: job.id, timestamp: job.timestamp, delay: job.delay });
}
process.stdout.write(JSON.stringify(out) + '\n');
await queue.close();
await connection.quit();
