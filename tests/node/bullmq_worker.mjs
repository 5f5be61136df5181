// Node worker for the parity tests: runs follow-up jobs added from Python and reports what it saw.
// usage: node bullmq_worker.mjs REDIS_URL COUNT
// prints one JSON line per run: {id, name, data, opts, attemptsMade, timestamp, delay, processedAt};
// a job whose text starts with "node-fail-once" throws on its first attempt.
// Exits 0 after COUNT jobs completed, 1 after 60 s.
import { Worker } from 'bullmq';
import IORedis from 'ioredis';

const [url, countArg] = process.argv.slice(2);
const count = Number(countArg);
const connection = new IORedis(url, { maxRetriesPerRequest: null });
let completed = 0;
const worker = new Worker('followup', async (job) => {
  const seen = {
    id: job.id, name: job.name, data: job.data, opts: job.opts, attemptsMade: job.attemptsMade,
    timestamp: job.timestamp, delay: job.delay, processedAt: Date.now(),
  };
  process.stdout.write(JSON.stringify(seen) + '\n');
  if (typeof job.data.text === 'string' && job.data.text.startsWith('node-fail-once') && job.attemptsMade === 0) {
    throw new Error('node worker: failing the first attempt on purpose');
  }
  return { node: true, leadId: job.data.leadId };
}, { connection, concurrency: 5 });
const guard = setTimeout(async () => { await worker.close(true); process.exit(1); }, 60000);
worker.on('completed', async () => {
  completed += 1;
  if (completed === count) {
    clearTimeout(guard);
    await worker.close();
    await connection.quit();
    process.exit(0);
  }
});
