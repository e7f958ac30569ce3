// Comms on one kernel connection (comm_open, comm_msg, comm_close) and the
// ipywidgets they carry. This part is always loaded and small: the widget
// code itself (the manager, the controls, their CSS) is a separate file,
// fetched on the kernel's first comm_open, so a page whose cells never make a
// widget loads none of it.

import { uuid } from "./ids.js";
import { loadModule } from "./lazy.js";
import { OutputArea } from "./output.js";
import { typeset } from "./render.js";
import { owners } from "./widgetviews.js";

const WIDGET_TARGET = "jupyter.widget";
const OUTPUT_TYPES = new Set(["stream", "display_data", "execute_result", "error", "clear_output",
    "update_display_data"]);
const MAX_PENDING = 2000; // callbacks of comm messages still waiting for their idle

/** One comm, as ipywidgets' manager expects it (IClassicComm). */
class Comm {
    constructor(router, commId, targetName) {
        this.router = router;
        this.comm_id = commId;
        this.target_name = targetName;
        this.msgCallback = null;
        this.closeCallback = null;
    }

    open(data, callbacks, metadata, buffers) {
        return this.router.send("comm_open",
            { comm_id: this.comm_id, target_name: this.target_name, data }, callbacks, metadata, buffers);
    }

    send(data, callbacks, metadata, buffers) {
        return this.router.send("comm_msg", { comm_id: this.comm_id, data }, callbacks, metadata, buffers);
    }

    close(data, callbacks, metadata, buffers) {
        if (!this.router.comms.has(this.comm_id)) {
            return "";
        }
        this.router.comms.delete(this.comm_id);
        let msgId = "";
        try {
            msgId = this.router.send("comm_close", { comm_id: this.comm_id, data: data || {} },
                callbacks, metadata, buffers);
        } catch (e) {
            // The connection is gone: the comm is closed all the same.
        }
        this.closed({ content: { comm_id: this.comm_id, data: data || {} } });
        return msgId;
    }

    on_msg(callback) {
        this.msgCallback = callback;
    }

    on_close(callback) {
        this.closeCallback = callback;
    }

    closed(msg) {
        owners.delete(this.comm_id);
        if (this.closeCallback) {
            this.closeCallback(msg);
        }
    }
}

/**
 * The comms of one kernel. Until the kernel opens a comm, every message goes
 * straight on (dispatch). From the first comm_open on, messages go through
 * one promise chain, so that each is handled after the one before it has
 * been, however long that took (loading the widget code, making a model):
 * a widget's display then always finds its model, and an Output widget
 * captures every output sent after it was told which request to capture.
 */
export class CommRouter {
    constructor(kernel) {
        this.kernel = kernel;
        this.chain = null;
        this.loading = null;
        this.manager = null;
        this.comms = new Map(); // comm_id -> Comm
        this.pending = new Map(); // msg_id of a message we sent -> callbacks
        this.captures = new Map(); // request msg_id -> capture(msg) of the Output widget that shows its output
        this.ours = new Set(); // msg_ids of the comm messages we sent, whose uncaptured output the cell shows
    }

    receive(msg, dispatch) {
        if (!this.chain) {
            if (msgType(msg) !== "comm_open") {
                dispatch(msg);
                return;
            }
            this.chain = Promise.resolve();
        }
        this.chain = this.chain.then(() => this.handle(msg, dispatch)).catch((e) => {
            console.error("sagecell: a widget message failed", e);
        });
    }

    /** Load the widget code and make this kernel's widget manager, once (this.manager stays null if that fails). */
    load() {
        if (!this.loading) {
            this.loading = this.makeManager();
        }
        return this.loading;
    }

    async makeManager() {
        try {
            const code = await loadModule(this.kernel.server, "widgets");
            this.manager = code.createManager(this, {
                outputArea: (el) => new OutputArea(el, document.createElement("div"), this.kernel.server),
                typeset: (el) => typeset(el, this.kernel.server).catch(() => {}),
            });
        } catch (e) {
            console.error("sagecell: could not load the widget code", e);
            this.loading = null; // the next comm_open tries again
        }
    }

    async handle(msg, dispatch) {
        const type = msgType(msg);
        const channel = msg.channel || "iopub";
        const parent = msg.parent_header && msg.parent_header.msg_id;
        const callbacks = parent ? this.pending.get(parent) : undefined;
        if (callbacks) {
            this.callback(callbacks, channel, type, msg, parent);
        }
        if (type === "comm_open") {
            await this.opened(msg);
            return;
        }
        if (type === "comm_msg" || type === "comm_close") {
            const comm = this.comms.get(msg.content && msg.content.comm_id);
            if (comm && type === "comm_msg" && comm.msgCallback) {
                await comm.msgCallback(msg);
            } else if (comm && type === "comm_close") {
                this.comms.delete(comm.comm_id);
                comm.closed(msg);
            }
            return;
        }
        if (channel === "iopub" && OUTPUT_TYPES.has(type)) {
            const capture = parent ? this.captures.get(parent) : undefined;
            if (capture) {
                capture(msg);
                return;
            }
            if (this.ours.has(parent) && this.kernel.lastHandler && this.kernel.lastHandler.iopub) {
                // Output of a widget's callback that no Output widget took: the latest run shows it.
                this.kernel.lastHandler.iopub(msg);
                return;
            }
        }
        dispatch(msg);
    }

    callback(callbacks, channel, type, msg, parent) {
        try {
            if (channel === "iopub" && type === "status") {
                if (callbacks.iopub && callbacks.iopub.status) {
                    callbacks.iopub.status(msg);
                }
                if (msg.content.execution_state === "idle") {
                    this.pending.delete(parent);
                    this.ours.delete(parent);
                }
            } else if (channel === "shell" && callbacks.shell && callbacks.shell.reply) {
                callbacks.shell.reply(msg);
            } else if (channel === "iopub" && type === "clear_output" && callbacks.iopub &&
                callbacks.iopub.clear_output) {
                callbacks.iopub.clear_output(msg);
            } else if (channel === "iopub" && OUTPUT_TYPES.has(type) && callbacks.iopub &&
                callbacks.iopub.output) {
                callbacks.iopub.output(msg);
            }
        } catch (e) {
            console.error(e);
        }
    }

    async opened(msg) {
        const c = msg.content || {};
        if (typeof c.comm_id !== "string") {
            return;
        }
        const comm = new Comm(this, c.comm_id, c.target_name);
        this.comms.set(c.comm_id, comm);
        if (c.target_name === WIDGET_TARGET) {
            await this.load();
        }
        if (c.target_name === WIDGET_TARGET && this.manager) {
            owners.set(c.comm_id, this);
            await this.manager.handle_comm_open(comm, msg).catch((e) => console.error(e));
        } else {
            // Nobody here speaks this target: close it, as Jupyter clients do.
            this.comms.delete(c.comm_id);
            try {
                this.send("comm_close", { comm_id: c.comm_id, data: {} });
            } catch (e) {
                // Not connected any more.
            }
        }
    }

    /** A comm the page opens (the manager asks for one). */
    newComm(targetName, commId = uuid()) {
        const comm = new Comm(this, commId, targetName);
        this.comms.set(commId, comm);
        if (targetName === WIDGET_TARGET) {
            owners.set(commId, this);
        }
        return comm;
    }

    /** Send a comm message; callbacks get its replies and status. Returns its msg_id. */
    send(msgTypeName, content, callbacks, metadata, buffers) {
        const msg = this.kernel.makeMessage(msgTypeName, content, "shell");
        if (metadata) {
            msg.metadata = metadata;
        }
        const id = msg.header.msg_id;
        if (callbacks) {
            this.pending.set(id, callbacks);
            while (this.pending.size > MAX_PENDING) {
                this.pending.delete(this.pending.keys().next().value);
            }
        }
        this.ours.add(id);
        while (this.ours.size > MAX_PENDING) {
            this.ours.delete(this.ours.values().next().value);
        }
        if (buffers && buffers.length) {
            msg.buffers = buffers;
        }
        this.kernel.send(msg);
        return id;
    }

    /** comm_info_request: the kernel's open comms of one target. */
    commInfo(targetName) {
        return new Promise((resolve) => {
            this.send("comm_info_request", { target_name: targetName }, {
                shell: { reply: (reply) => resolve((reply.content && reply.content.comms) || {}) },
            });
        });
    }

    /** Output of requests with this msg_id goes to capture(msg) instead of the cell. */
    capture(msgId, capture) {
        this.captures.set(msgId, capture);
    }

    release(msgId, capture) {
        if (this.captures.get(msgId) === capture) {
            this.captures.delete(msgId);
        }
    }

    show(modelId, el) {
        const shown = (this.chain || Promise.resolve()).then(() => {
            if (!this.manager) {
                el.textContent = "(The widget code could not be loaded.)";
                return undefined;
            }
            return this.manager.showModel(modelId, el);
        });
        shown.catch((e) => {
            el.textContent = `(The widget could not be shown: ${e && e.message ? e.message : e})`;
        });
    }
}

function msgType(msg) {
    return msg.header ? msg.header.msg_type : msg.msg_type;
}
