// Node BullMQ worker for bench/followups.py: the same queue and settings as the Python worker, a no-op processor.
// usage: node bullmq_bench.mjs REDIS_URL run N CONCURRENCY LOCK_MS STALLED_MS DRAIN_S
//        node bullmq_bench.mjs REDIS_URL idle SECONDS CONCURRENCY LOCK_MS STALLED_MS DRAIN_S
// "run" prints {"elapsed_ms": ...} once N jobs completed (clock from `new Worker` to the Nth completion).
import { Worker } from 'bullmq';
import IORedis from 'ioredis';

const [url, mode, nArg, cArg, lockArg, stalledArg, drainArg] = process.argv.slice(2);
const connection = new IORedis(url, { maxRetriesPerRequest: null });
const opts = {
  connection, concurrency: Number(cArg), lockDuration: Number(lockArg), stalledInterval: Number(stalledArg),
  drainDelay: Number(drainArg), // seconds
};
const t0 = process.hrtime.bigint();
const worker = new Worker('followup', async () => null, opts);
if (mode === 'run') {
  const n = Number(nArg);
  let done = 0;
  worker.on('completed', async () => {
    done += 1;
    if (done === n) {
      const elapsed = Number(process.hrtime.bigint() - t0) / 1e6;
      process.stdout.write(JSON.stringify({ elapsed_ms: elapsed }) + '\n');
      await worker.close();
      await connection.quit();
      process.exit(0);
    }
  });
} else {
  setTimeout(async () => { await worker.close(); await connection.quit(); process.exit(0); }, Number(nArg) * 1000);
}
