// Drive a sagecell_tw server with the unmodified @jupyterlab/services, the way
// a JupyterLab extension does: SessionManager + KernelManager, one session, its
// KernelConnection. Prints one JSON line per step with what the client saw.
//
//   node run.mjs http://127.0.0.1:8888 json|v1
//
// Framing: KernelConnection always offers the subprotocol
// v1.kernel.websocket.jupyter.org (its list comes from
// KernelMessage.supportedKernelWebSocketProtocols, with no option), and then
// (de)serializes in whatever framing the server selected: it hands
// `ws.protocol` to `serverSettings.serializer`, where '' means the default
// JSON framing. So the one public way to get the default framing is the
// `WebSocket` constructor in ServerConnection.makeSettings: for "json" ours
// offers no subprotocol (as a client before @jupyterlab/services 7 or any
// plain client does), the server selects none, and the library's own
// serializer takes the default framing. For "v1" the offer goes out as is.
//
// Every wait is bounded; the exit code is 0 only if every step ran.

import { KernelManager, KernelSpecManager, ServerConnection, SessionManager } from '@jupyterlab/services';
import WebSocket from 'ws';

const [baseUrl, framing] = process.argv.slice(2);
// stdout carries only our JSON lines; the library's own console chatter goes to stderr.
console.log = console.info = console.debug = console.error;
if (!baseUrl || !['json', 'v1'].includes(framing)) {
  console.error('usage: node run.mjs BASE_URL json|v1');
  process.exit(2);
}
const STEP_TIMEOUT_MS = 20000;

// What went over the kernel sockets, seen from the client side.
const wire = { protocols: [], sent: { text: 0, binary: 0 }, received: { text: 0, binary: 0 } };

class ObservedWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, framing === 'json' ? [] : protocols);
    this.on('open', () => wire.protocols.push(this.protocol));
    this.on('message', (_data, isBinary) => (isBinary ? wire.received.binary++ : wire.received.text++));
  }

  send(data, ...rest) {
    typeof data === 'string' ? wire.sent.text++ : wire.sent.binary++;
    return super.send(data, ...rest);
  }
}

const serverSettings = ServerConnection.makeSettings({
  baseUrl,
  wsUrl: baseUrl.replace(/^http/, 'ws'),
  WebSocket: ObservedWebSocket,
  fetch, // Node 20's own
  Request,
  Headers,
  token: '',
  appendToken: false
});

function emit(step, fields) {
  process.stdout.write(JSON.stringify({ step, ...fields }) + '\n');
}

function withTimeout(promise, what, ms = STEP_TIMEOUT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

/** Run code; collect its iopub messages and its reply (as a notebook cell would). */
async function execute(kernel, code, { allowStdin = false, onStdin } = {}) {
  const future = kernel.requestExecute({ code, allow_stdin: allowStdin, stop_on_error: true });
  const iopub = [];
  future.onIOPub = msg => iopub.push(msg);
  if (onStdin) {
    future.onStdin = onStdin;
  }
  const reply = await withTimeout(future.done, `execute ${JSON.stringify(code)}`);
  return { reply: reply.content, iopub };
}

const streamText = iopub =>
  iopub
    .filter(m => m.header.msg_type === 'stream' && m.content.name === 'stdout')
    .map(m => m.content.text)
    .join('');

const errorOf = iopub => {
  const err = iopub.find(m => m.header.msg_type === 'error');
  return err ? { ename: err.content.ename, evalue: err.content.evalue, traceback: err.content.traceback } : null;
};

const steps = [];
const step = (name, fn) => steps.push([name, fn]);
const state = {};

step('connect', async () => {
  // The launcher's view: the kernel specs (the library validates the model).
  state.specManager = new KernelSpecManager({ serverSettings });
  await withTimeout(state.specManager.ready, 'kernel specs');
  const specs = state.specManager.specs;
  state.kernelManager = new KernelManager({ serverSettings });
  state.sessionManager = new SessionManager({ kernelManager: state.kernelManager, serverSettings });
  await withTimeout(state.sessionManager.ready, 'session manager ready');
  state.session = await withTimeout(
    state.sessionManager.startNew({
      path: 'jupyterlab-client.ipynb',
      name: 'jupyterlab-client.ipynb',
      type: 'notebook',
      kernel: { name: 'python3' }
    }),
    'start session'
  );
  state.kernel = state.session.kernel;
  const info = await withTimeout(state.kernel.info, 'kernel_info');
  return {
    session_id: state.session.id,
    kernel_id: state.kernel.id,
    implementation: info.implementation,
    language: info.language_info.name,
    protocol: wire.protocols.at(-1),
    default_spec: specs.default,
    display_name: specs.kernelspecs[specs.default]?.display_name
  };
});

step('poll', async () => {
  // Anonymously the server refuses to list kernels and sessions (403): the
  // managers' polls fail, are retried later, and leave their kernels alone
  // (an empty list would make the KernelManager shut its connections down).
  await withTimeout(state.kernelManager.ready, 'kernel manager ready');
  await withTimeout(state.kernelManager.refreshRunning(), 'kernel manager refresh');
  await withTimeout(state.sessionManager.refreshRunning(), 'session manager refresh');
  const listing = async path => (await withTimeout(fetch(`${baseUrl}${path}`), `GET ${path}`)).status;
  const { reply, iopub } = await execute(state.kernel, "print('still here')");
  return {
    kernel_manager_ready: state.kernelManager.isReady,
    session_manager_ready: state.sessionManager.isReady,
    kernels_listing: await listing('/api/kernels'),
    sessions_listing: await listing('/api/sessions'),
    kernel_disposed: state.kernel.isDisposed,
    kernel_status: state.kernel.status,
    status: reply.status,
    stdout: streamText(iopub)
  };
});

step('execute', async () => {
  const { reply, iopub } = await execute(state.kernel, "for i in range(3): print('line', i)\n6*7");
  const result = iopub.find(m => m.header.msg_type === 'execute_result');
  return {
    status: reply.status,
    stdout: streamText(iopub),
    result: result?.content.data['text/plain'],
    states: iopub.filter(m => m.header.msg_type === 'status').map(m => m.content.execution_state)
  };
});

step('error', async () => {
  const { reply, iopub } = await execute(state.kernel, '1/0');
  return { status: reply.status, reply_ename: reply.ename, error: errorOf(iopub) };
});

step('input', async () => {
  let prompt = null;
  const { reply, iopub } = await execute(state.kernel, "x = input('name? ')\nprint('hello', x)", {
    allowStdin: true,
    onStdin: msg => {
      if (msg.header.msg_type === 'input_request') {
        prompt = msg.content.prompt;
        state.kernel.sendInputReply({ status: 'ok', value: 'world' }, msg.header);
      }
    }
  });
  return { status: reply.status, prompt, stdout: streamText(iopub) };
});

step('display', async () => {
  const { reply, iopub } = await execute(
    state.kernel,
    "from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b> move'))"
  );
  const shown = iopub.filter(m => m.header.msg_type === 'display_data').map(m => m.content.data);
  return { status: reply.status, displays: shown };
});

// Comms both ways, with binary buffers, and an ipywidgets slider moved from here.
const COMM_KERNEL_CODE = `
from comm import create_comm
import ipywidgets
def _echo_on(comm):
    comm.on_msg(lambda m: comm.send({"echo": m["content"]["data"]}, buffers=[bytes(b)[::-1] for b in m["buffers"]]))
_page = create_comm(target_name="sagecell.node", data={"hello": "node"}, buffers=[b"\\x00\\x01\\xfe\\xff"])
_echo_on(_page)
def _opened(comm, msg):
    comm.send({"opened_with": msg["content"]["data"]})
get_ipython().kernel.comm_manager.register_target("sagecell.echo", _opened)
_slider = ipywidgets.IntSlider(value=3)
_slider.observe(lambda change: print("value", change["new"]), "value")
display(_slider)
`;

const bytesOf = b => Array.from(ArrayBuffer.isView(b) ? new Uint8Array(b.buffer, b.byteOffset, b.byteLength) : new Uint8Array(b));

step('comm', async () => {
  const kernel = state.kernel;
  const binaryBefore = { sent: wire.sent.binary, received: wire.received.binary };
  const kernelComms = [];
  const opened = new Promise(resolve => {
    kernel.registerCommTarget('sagecell.node', (comm, msg) => resolve({ comm, msg }));
  });
  kernel.registerCommTarget('jupyter.widget', (comm, msg) => kernelComms.push({ comm, msg }));
  const setup = await execute(kernel, COMM_KERNEL_CODE);
  // Kernel -> client: the comm the kernel opened, with its buffer; a message both ways on it.
  const { comm, msg: openMsg } = await withTimeout(opened, 'comm_open from the kernel');
  const echoed = new Promise(resolve => (comm.onMsg = m => resolve(m)));
  comm.send({ ping: 2 }, undefined, [new Uint8Array([1, 2, 3, 250])]);
  const echo = await withTimeout(echoed, 'the echo on the kernel comm');
  // Client -> kernel: a comm opened on the kernel's target, answered.
  const mine = kernel.createComm('sagecell.echo');
  const answered = new Promise(resolve => (mine.onMsg = m => resolve(m)));
  mine.open({ x: 1 });
  const answer = await withTimeout(answered, 'the answer on the comm we opened');
  // The widget: its model came as a comm; moving it runs the kernel's observer.
  const slider = kernelComms.find(c => c.msg.content.data.state._model_name === 'IntSliderModel');
  const echoes = [];
  slider.comm.onMsg = m => echoes.push(m.content.data);
  const future = slider.comm.send({ method: 'update', state: { value: 7 }, buffer_paths: [] });
  const moved = [];
  future.onIOPub = m => moved.push(m);
  await withTimeout(future.done, 'the slider update to go idle');
  return {
    status: setup.reply.status,
    opened: { target: openMsg.content.target_name, data: openMsg.content.data, buffers: openMsg.buffers.map(bytesOf) },
    echo: { data: echo.content.data, buffers: echo.buffers.map(bytesOf) },
    answer: answer.content.data,
    widget: {
      model: slider.msg.content.data.state._model_name,
      value: slider.msg.content.data.state.value,
      shown: setup.iopub.some(m => m.header.msg_type === 'display_data' && 'application/vnd.jupyter.widget-view+json' in m.content.data),
      stdout: streamText(moved),
      echoes
    },
    binary: { sent: wire.sent.binary - binaryBefore.sent, received: wire.received.binary - binaryBefore.received }
  };
});

step('interrupt', async () => {
  await execute(state.kernel, 'import time');
  const future = state.kernel.requestExecute({ code: 'time.sleep(30)' });
  const iopub = [];
  const started = new Promise(resolve => {
    future.onIOPub = msg => {
      iopub.push(msg);
      if (msg.header.msg_type === 'execute_input') resolve();
    };
  });
  const replied = new Promise(resolve => {
    future.onReply = msg => resolve({ msg, at: performance.now() });
  });
  await withTimeout(started, 'execute_input of time.sleep(30)');
  await sleep(300); // let the code reach time.sleep, as a person would
  const t0 = performance.now();
  await withTimeout(state.kernel.interrupt(), 'interrupt');
  const interruptReturned = performance.now();
  const { msg, at } = await withTimeout(replied, 'execute_reply after the interrupt');
  await withTimeout(future.done, 'idle after the interrupt');
  return {
    status: msg.content.status,
    reply_ename: msg.content.ename,
    error: errorOf(iopub),
    interrupt_call_s: (interruptReturned - t0) / 1000,
    reply_after_interrupt_s: (at - t0) / 1000
  };
});

step('restart', async () => {
  const before = await execute(state.kernel, "marker = 'before restart'\nprint('marker' in dir())");
  // A second view of the same kernel (as a console next to a notebook): it
  // hears about the restart only from the server, so what it hears is decided.
  const observer = state.kernelManager.connectTo({ model: { id: state.kernel.id, name: state.kernel.name } });
  await withTimeout(observer.info, 'kernel_info on a second connection');
  // What JupyterLab shows the user follows the status the library reports:
  // 'autorestarting' is its word for "the kernel died and the server
  // restarted it". It reacts to some messages asynchronously (and may drop
  // them), so also note every status message as it comes off the socket.
  const seen = kernel => {
    const statuses = [];
    const received = [];
    kernel.statusChanged.connect((_, status) => statuses.push(status));
    kernel.anyMessage.connect((_, { msg, direction }) => {
      if (direction === 'recv' && msg.header.msg_type === 'status') received.push(msg.content.execution_state);
    });
    return { statuses, received };
  };
  const restarter = seen(state.kernel);
  const other = seen(observer);
  const sockets = wire.protocols.length;
  await withTimeout(state.kernel.restart(), 'restart');
  const after = await execute(state.kernel, "print('marker' in dir())");
  const otherAfter = await execute(observer, "print('marker' in dir())");
  observer.dispose();
  return {
    kernel_id: state.kernel.id,
    restarter,
    other,
    new_sockets: wire.protocols.length - sockets,
    before: streamText(before.iopub),
    after: streamText(after.iopub),
    after_status: after.reply.status,
    other_after: streamText(otherAfter.iopub)
  };
});

step('shutdown', async () => {
  const kernelId = state.kernel.id;
  const sessionId = state.session.id;
  await withTimeout(state.session.shutdown(), 'session shutdown');
  const status = async path => (await withTimeout(fetch(`${baseUrl}${path}`), `GET ${path}`)).status;
  return {
    kernel_id: kernelId,
    kernel_status: state.kernel.status,
    kernel_answer: await status(`/api/kernels/${kernelId}`),
    session_answer: await status(`/api/sessions/${sessionId}`)
  };
});

let failed = false;
for (const [name, fn] of steps) {
  try {
    emit(name, await fn());
  } catch (err) {
    failed = true;
    emit(name, { failed: String(err?.stack ?? err) });
    if (!state.kernel) break;
  }
}
emit('wire', wire);
state.sessionManager?.dispose();
state.kernelManager?.dispose();
state.specManager?.dispose();
process.exit(failed ? 1 : 0);
