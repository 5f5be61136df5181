// A Node BullMQ worker run against the migrated target (phase 10): proves npm bullmq runs jobs on it, over TLS.
// usage: BULLMQ_REDIS_URL=rediss://... node bullmq_target_worker.mjs QUEUE COUNT [TIMEOUT_S]
// The URL comes from the environment (it holds a password: never on the command line); it may be rediss:// (TLS):
// the CA then comes from NODE_EXTRA_CA_CERTS, and certificate checks stay on.
// Processes jobs of QUEUE (added from Python) until COUNT completed, then prints one JSON line:
// {completed, failed, firstProcessedOn, lastFinishedOn, names}; exits 0, or 1 with the same line after TIMEOUT_S.
import { Worker } from 'bullmq';
import IORedis from 'ioredis';

const url = process.env.BULLMQ_REDIS_URL;
const [queue, countArg, timeoutArg] = process.argv.slice(2);
const count = Number(countArg);
const timeoutMs = Number(timeoutArg || 60) * 1000;
const connection = new IORedis(url, { maxRetriesPerRequest: null });
let completed = 0;
let failed = 0;
let firstProcessedOn = null;
let lastFinishedOn = null;
const names = {};
const worker = new Worker(queue, async (job) => {
  firstProcessedOn = firstProcessedOn === null ? job.processedOn : Math.min(firstProcessedOn, job.processedOn);
  names[job.name] = (names[job.name] || 0) + 1;
  return { node: true, n: job.data.n };
}, { connection, concurrency: 10 });
const report = () => JSON.stringify({ completed, failed, firstProcessedOn, lastFinishedOn, names });
const finish = async (code) => {
  clearTimeout(guard);
  await worker.close();
  await connection.quit();
  process.stdout.write(report() + '\n');
  process.exit(code);
};
const guard = setTimeout(() => finish(1), timeoutMs);
worker.on('failed', () => { failed += 1; });
worker.on('completed', (job) => {
  completed += 1;
  lastFinishedOn = Math.max(lastFinishedOn || 0, job.finishedOn || Date.now());
  if (completed === count) finish(0);
});
worker.on('error', (err) => { process.stderr.write(`worker error: ${err.message}\n`); });
