// What the unmodified @jupyterlab/services sees when the daemon that holds its
// kernel dies behind HAProxy (tests/test_haproxy.py).
//
//   node lost.mjs http://127.0.0.1:PORT DAEMON [WAIT_MS]
//
// Starts kernels until one is on DAEMON (its id begins "DAEMON-"), runs code
// on it, prints {"step": "ready", "id"} and waits for a line on stdin (the
// test kills the daemon meanwhile); then prints what the client saw: the
// connection and kernel statuses it went through, what a REST call for the
// kernel raised, and what an execute did. It waits WAIT_MS (default 3000)
// for the library to give the socket up (it retries with backoff, seven
// times, for well over a minute). Every wait is bounded.

import { KernelAPI, KernelManager, ServerConnection } from '@jupyterlab/services';
import WebSocket from 'ws';
import readline from 'node:readline';

const [baseUrl, daemon, waitMs] = process.argv.slice(2);
console.log = console.info = console.debug = console.warn = console.error;
const serverSettings = ServerConnection.makeSettings({
  baseUrl,
  wsUrl: baseUrl.replace(/^http/, 'ws'),
  WebSocket,
  fetch,
  Request,
  Headers,
  token: '',
  appendToken: false
});

function emit(step, fields) {
  process.stdout.write(JSON.stringify({ step, ...fields }) + '\n');
}

function within(ms, promise, what) {
  return Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms))]);
}

const manager = new KernelManager({ serverSettings, standby: 'never' });
let kernel = null;
for (let i = 0; i < 8 && !kernel; i++) {
  const k = await within(20000, manager.startNew({ name: 'python3' }), 'startNew');
  if (k.id.startsWith(`${daemon}-`)) {
    kernel = k;
  } else {
    await k.shutdown();
  }
}
if (!kernel) {
  emit('error', { message: `no kernel landed on ${daemon}` });
  process.exit(1);
}
await within(20000, kernel.requestExecute({ code: 'x = 1' }).done, 'execute');
const connection = [];
const status = [];
kernel.connectionStatusChanged.connect((_, s) => connection.push(s));
kernel.statusChanged.connect((_, s) => status.push(s));
emit('ready', { id: kernel.id });

const lines = readline.createInterface({ input: process.stdin });
await new Promise((resolve) => lines.once('line', resolve));

const deadline = Date.now() + Number(waitMs || 3000);
while (kernel.connectionStatus !== 'disconnected' && Date.now() < deadline) {
  await new Promise((r) => setTimeout(r, 100));
}
let rest = null;
try {
  await within(10000, KernelAPI.getKernelModel(kernel.id, serverSettings), 'getKernelModel');
} catch (e) {
  rest = { name: e.name, status: e.response ? e.response.status : null, message: e.message };
}
let execute = null;
try {
  await within(2000, kernel.requestExecute({ code: '1' }).done, 'execute');
} catch (e) {
  execute = e.message;
}
emit('lost', { connection, status, connectionStatus: kernel.connectionStatus, rest, execute });
process.exit(0);
