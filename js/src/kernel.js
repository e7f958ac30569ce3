// One kernel on the server and the WebSocket that talks to it.
//
// Replies and output are routed back to whoever sent the request by the
// parent header's msg_id, so several cells can share one kernel (linked cells).

import { CommRouter } from "./comms.js";
import { uuid } from "./ids.js";

const CONNECT_TIMEOUT_MS = 20000;
// A dropped WebSocket is opened again, after these waits: the first soon
// (a proxy restart is over in a moment), then doubling up to RECONNECT_MAX_MS,
// for as long as a server keeps a session with nobody connected
// (--disconnect-timeout, 60 s by default) and a little more.
const RECONNECT_FIRST_MS = 250;
const RECONNECT_MAX_MS = 8000;
const RECONNECT_GIVE_UP_MS = 90000;

/** How long to wait before reconnect attempt `attempt` (0, 1, ...). */
export function reconnectDelay(attempt) {
    return Math.min(RECONNECT_MAX_MS, RECONNECT_FIRST_MS * 2 ** attempt);
}
const MAX_HANDLERS = 200;
const ORPHAN_OUTPUT = ["stream", "error", "display_data"];

/** Decode a binary frame (Jupyter's default framing: u32 BE count, u32 BE offsets). */
export function decodeBinaryFrame(buffer) {
    const view = new DataView(buffer);
    const nbufs = view.getUint32(0);
    const offsets = [];
    for (let i = 1; i <= nbufs; i++) {
        offsets.push(view.getUint32(i * 4));
    }
    offsets.push(buffer.byteLength);
    const json = new TextDecoder("utf-8").decode(
        new Uint8Array(buffer.slice(offsets[0], offsets[1])),
    );
    const msg = JSON.parse(json);
    msg.buffers = [];
    for (let i = 1; i < nbufs; i++) {
        msg.buffers.push(new DataView(buffer.slice(offsets[i], offsets[i + 1])));
    }
    return msg;
}

/** A message with buffers as a binary frame (the same framing: count, offsets, JSON, buffers). */
export function encodeBinaryFrame(msg) {
    const buffers = msg.buffers.map((b) => (b instanceof ArrayBuffer
        ? new Uint8Array(b) : new Uint8Array(b.buffer, b.byteOffset, b.byteLength)));
    const json = new TextEncoder().encode(JSON.stringify({ ...msg, buffers: [] }));
    const parts = [json, ...buffers];
    const header = 4 * (parts.length + 1);
    const total = header + parts.reduce((n, p) => n + p.byteLength, 0);
    const out = new Uint8Array(total);
    const view = new DataView(out.buffer);
    view.setUint32(0, parts.length);
    let offset = header;
    parts.forEach((p, i) => {
        view.setUint32(4 * (i + 1), offset);
        out.set(p, offset);
        offset += p.byteLength;
    });
    return out.buffer;
}

export class Kernel {
    /**
     * @param {import("./server.js").Server} server
     * @param {string} name kernel name to ask for
     */
    constructor(server, name = "python3") {
        this.server = server;
        this.name = name;
        this.id = null;
        this.sessionId = uuid();
        this.ws = null;
        this.status = "new";
        this.closed = false; // shut down on purpose
        this.handlers = new Map(); // request msg_id -> {iopub, shell, stdin, closed}
        this.lastHandler = null; // of the latest execute_request
        this.statusListeners = new Set();
        this.closeListeners = new Set();
        this.lastMsgId = null; // of the last message received: the server replays what came after
        this.reconnecting = null; // a Promise while the socket is being opened again
        this.wakeReconnect = null; // ends the wait before the next attempt
        this.gone = false; // the server said the session is no more
        this.goneReason = ""; // what it said, when it said more than 404
        this.comms = new CommRouter(this); // comms and widgets, loaded on the first comm_open
    }

    setStatus(status) {
        if (this.status === status) {
            return;
        }
        this.status = status;
        for (const fn of this.statusListeners) {
            try {
                fn(status, this);
            } catch (e) {
                console.error(e);
            }
        }
    }

    get alive() {
        return !this.closed && ["idle", "busy", "starting"].includes(this.status) &&
            this.ws !== null && this.ws.readyState === WebSocket.OPEN;
    }

    /** Ask the server for a kernel and connect to it; resolves once connected. */
    async start() {
        this.setStatus("starting");
        let model;
        try {
            model = await this.server.startKernel(this.name);
        } catch (e) {
            this.setStatus("unreachable");
            throw e;
        }
        this.id = model.id;
        await this.connect();
        if (this.status === "starting" && model.execution_state && model.execution_state !== "starting") {
            this.setStatus(model.execution_state);
        }
        return this;
    }

    connect() {
        const url = this.server.channelsURL(this.id, this.sessionId, this.lastMsgId);
        return new Promise((resolve, reject) => {
            let opened = false;
            let ws;
            try {
                ws = new WebSocket(url);
            } catch (e) {
                this.setStatus("disconnected");
                reject(new Error(`Cannot open a WebSocket to ${url}: ${e.message || e}`));
                return;
            }
            ws.binaryType = "arraybuffer";
            this.ws = ws;
            const timer = setTimeout(() => {
                if (!opened) {
                    ws.close();
                    reject(new Error(`Timed out connecting the WebSocket to ${this.server.base}`));
                }
            }, CONNECT_TIMEOUT_MS);
            ws.onopen = () => {
                opened = true;
                clearTimeout(timer);
                if (this.status === "starting" || this.status === "new") {
                    this.setStatus("idle");
                }
                resolve();
            };
            ws.onmessage = (event) => {
                if (this.ws === ws) {
                    this.onFrame(event.data);
                }
            };
            ws.onerror = () => {
                // The close event that follows carries the code and reason.
            };
            ws.onclose = (event) => {
                clearTimeout(timer);
                if (this.ws !== ws) {
                    return; // a socket replaced by a newer one
                }
                this.ws = null;
                if (!opened) {
                    this.setStatus("disconnected");
                    const why = event.reason ? `: ${event.reason}` : "";
                    reject(new Error(
                        `The server refused the WebSocket connection (code ${event.code}${why})`,
                    ));
                    return;
                }
                this.onClose(event.code, event.reason);
            };
        });
    }

    onClose(code, reason) {
        if (!this.closed && this.status !== "dead" && this.id) {
            this.reconnect({ code, reason });
            return;
        }
        this.lost(code, reason);
    }

    /** Tell every run and listener that the connection is gone for good. */
    lost(code, reason) {
        if (!this.closed && this.status !== "dead") {
            this.setStatus("disconnected");
        }
        const info = { code, reason, intentional: this.closed };
        for (const handler of this.handlers.values()) {
            if (handler.closed) {
                try {
                    handler.closed(info);
                } catch (e) {
                    console.error(e);
                }
            }
        }
        for (const fn of this.closeListeners) {
            try {
                fn(info, this);
            } catch (e) {
                console.error(e);
            }
        }
    }

    /**
     * The socket dropped while the session lives: open it again with backoff
     * (reconnectDelay), telling runs and status listeners, until it opens,
     * the server says the session is gone, or RECONNECT_GIVE_UP_MS pass.
     * The server replays what was sent after lastMsgId.
     */
    reconnect(info) {
        if (this.reconnecting) {
            return this.reconnecting;
        }
        this.setStatus("reconnecting");
        this.tellHandlers("reconnecting", info);
        const started = Date.now();
        const online = () => this.reconnectNow();
        window.addEventListener("online", online);
        this.reconnecting = (async () => {
            for (let attempt = 0; !this.closed; attempt++) {
                await new Promise((resolve) => {
                    const timer = setTimeout(resolve, reconnectDelay(attempt));
                    this.wakeReconnect = () => {
                        clearTimeout(timer);
                        resolve();
                    };
                });
                this.wakeReconnect = null;
                if (this.closed) {
                    break;
                }
                try {
                    await this.connect();
                    window.removeEventListener("online", online);
                    this.reconnecting = null;
                    this.tellHandlers("reconnected", { attempts: attempt + 1 });
                    return true;
                } catch (e) {
                    // Refused, or no answer: is the session still there?
                }
                if (await this.sessionGone() || Date.now() - started > RECONNECT_GIVE_UP_MS) {
                    break;
                }
                this.setStatus("reconnecting");
            }
            window.removeEventListener("online", online);
            this.reconnecting = null;
            this.lost(info.code, this.gone ? this.goneReason || "the session has ended on the server" : "could not reconnect");
            return false;
        })();
        return this.reconnecting;
    }

    /** Try the next reconnect now (the browser says it is online again). */
    reconnectNow() {
        if (this.wakeReconnect) {
            this.wakeReconnect();
        }
    }

    async sessionGone() {
        try {
            const response = await fetch(this.server.url(`/api/kernels/${encodeURIComponent(this.id)}`), {
                headers: this.server.token ? { Authorization: `token ${this.server.token}` } : {},
                mode: "cors",
                credentials: "omit",
                cache: "no-store",
            });
            this.gone = response.status === 404 || (response.status === 503 && await this.kernelLost(response));
        } catch (e) {
            this.gone = false; // unreachable: it may come back
        }
        return this.gone;
    }

    /**
     * A 503 that says the daemon holding the kernel is gone (a load balancer's
     * or another daemon's "kernel lost" answer), rather than a server that is
     * busy for a moment: nothing to reconnect to.
     */
    async kernelLost(response) {
        try {
            const body = await response.json();
            const message = body && typeof body.message === "string" ? body.message : "";
            if (message.startsWith("kernel lost")) {
                this.goneReason = message;
                return true;
            }
        } catch (e) {
            // Not JSON: a proxy's own page; it may come back.
        }
        return false;
    }

    tellHandlers(what, info) {
        for (const handler of this.handlers.values()) {
            if (handler[what]) {
                try {
                    handler[what](info);
                } catch (e) {
                    console.error(e);
                }
            }
        }
    }

    onFrame(data) {
        let msg;
        try {
            msg = typeof data === "string" ? JSON.parse(data) : decodeBinaryFrame(data);
        } catch (e) {
            console.warn("sagecell: could not decode a message from the server", e);
            return;
        }
        if (msg.header && msg.header.msg_id) {
            this.lastMsgId = msg.header.msg_id;
        }
        this.comms.receive(msg, (m) => this.dispatch(m));
    }

    /** Hand one message to the request that caused it (and the kernel's status). */
    dispatch(msg) {
        const channel = msg.channel || "iopub";
        const msgType = msg.header ? msg.header.msg_type : msg.msg_type;
        if (channel === "iopub" && msgType === "status") {
            const state = msg.content && msg.content.execution_state;
            if (state) {
                this.setStatus(state);
            }
        }
        const parent = msg.parent_header && msg.parent_header.msg_id;
        let handler = parent ? this.handlers.get(parent) : undefined;
        if (!handler && channel === "iopub" && ORPHAN_OUTPUT.includes(msgType)) {
            // The server's own notices (session ended, kernel died) have no
            // parent: show them where the latest run is shown.
            handler = this.lastHandler;
        }
        if (handler && handler[channel]) {
            try {
                handler[channel](msg);
            } catch (e) {
                console.error("sagecell: error while showing output", e);
            }
        }
        // A kernel that dies or restarts ends every run on it, whoever sent it.
        const everyone = ["dead", "restarting", "autorestarting", "starting"];
        if (channel === "iopub" && msgType === "status" &&
            everyone.includes(msg.content.execution_state)) {
            for (const h of this.handlers.values()) {
                if (h !== handler && h.iopub) {
                    try {
                        h.iopub(msg);
                    } catch (e) {
                        console.error(e);
                    }
                }
            }
        }
    }

    makeMessage(msgType, content, channel) {
        return {
            header: {
                msg_id: uuid(),
                msg_type: msgType,
                session: this.sessionId,
                username: "sagecell",
                date: new Date().toISOString(),
                version: "5.3",
            },
            parent_header: {},
            metadata: {},
            content,
            buffers: [],
            channel,
        };
    }

    send(msg) {
        if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
            throw new Error("Not connected to the kernel");
        }
        this.ws.send(msg.buffers && msg.buffers.length ? encodeBinaryFrame(msg) : JSON.stringify(msg));
    }

    /**
     * Run code; handler = {iopub(msg), shell(msg), stdin(msg), closed(info)}.
     * @returns {string} the execute_request's msg_id
     */
    execute(code, handler) {
        const msg = this.makeMessage(
            "execute_request",
            {
                code,
                silent: false,
                store_history: true,
                user_expressions: {},
                allow_stdin: true,
                stop_on_error: true,
            },
            "shell",
        );
        this.handlers.set(msg.header.msg_id, handler);
        this.lastHandler = handler;
        while (this.handlers.size > MAX_HANDLERS) {
            this.handlers.delete(this.handlers.keys().next().value);
        }
        this.send(msg);
        return msg.header.msg_id;
    }

    forget(msgId) {
        this.handlers.delete(msgId);
    }

    /** Answer an input_request (the stdin channel). */
    inputReply(value, requestHeader) {
        const msg = this.makeMessage("input_reply", { value }, "stdin");
        msg.parent_header = requestHeader;
        this.send(msg);
    }

    async interrupt() {
        if (this.id) {
            await this.server.interruptKernel(this.id);
        }
    }

    /** End the kernel on the server and close the socket. */
    shutdown({ keepalive = false } = {}) {
        if (this.closed) {
            return Promise.resolve();
        }
        this.closed = true;
        this.setStatus("closed");
        this.reconnectNow();
        if (this.ws) {
            try {
                this.ws.close(1000, "closed by the page");
            } catch (e) {
                // Already closing.
            }
        }
        if (!this.id) {
            return Promise.resolve();
        }
        return this.server.deleteKernel(this.id, { keepalive }).catch(() => {});
    }
}

/**
 * The kernel that one or more cells use. Linked cells share a group; an
 * unlinked cell has its own. A dead kernel is replaced on the next request.
 */
export class KernelGroup {
    constructor(server, key, name = "python3") {
        this.server = server;
        this.key = key;
        this.name = name;
        this.kernel = null;
        this.starting = null;
        this.cells = new Set();
        this.generation = 0; // how many kernels this group has had
        this.listeners = new Set(); // (status, kernel) => void
        this.newKernelListeners = new Set(); // (kernel, generation) => Promise|void
    }

    get status() {
        if (this.starting) {
            return "starting";
        }
        return this.kernel ? this.kernel.status : "none";
    }

    emit(status, kernel) {
        for (const fn of this.listeners) {
            try {
                fn(status, kernel);
            } catch (e) {
                console.error(e);
            }
        }
    }

    /** The live kernel, starting a new one if there is none. */
    ensure() {
        if (this.kernel && this.kernel.alive) {
            return Promise.resolve(this.kernel);
        }
        if (this.kernel && this.kernel.reconnecting) {
            // Its socket is being opened again: wait for it rather than lose the session.
            return this.kernel.reconnecting.then(() => this.ensure());
        }
        if (this.starting) {
            return this.starting;
        }
        const kernel = new Kernel(this.server, this.name);
        kernel.statusListeners.add((status) => {
            if (this.kernel === kernel || this.starting) {
                this.emit(status, kernel);
            }
        });
        const previous = this.kernel;
        this.starting = (async () => {
            try {
                await kernel.start();
            } finally {
                this.starting = null;
            }
            this.kernel = kernel;
            this.generation += 1;
            if (previous && !previous.closed) {
                previous.shutdown().catch(() => {});
            }
            for (const fn of this.newKernelListeners) {
                try {
                    await fn(kernel, this.generation);
                } catch (e) {
                    console.error(e);
                }
            }
            this.emit(kernel.status, kernel);
            return kernel;
        })();
        this.emit("starting", kernel);
        return this.starting;
    }

    shutdown({ keepalive = false } = {}) {
        const kernel = this.kernel;
        this.kernel = null;
        if (kernel) {
            return kernel.shutdown({ keepalive });
        }
        return Promise.resolve();
    }
}
