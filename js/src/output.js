// The output of one cell: a list of outputs built from iopub messages, in the
// order they came, plus input boxes, notices and the files the code wrote.

import { AnsiUp } from "ansi_up";

import { ansiElement, renderBundle } from "./render.js";

const MAX_STREAM_CHARS = 1000000; // per run, in the browser
const MAX_OUTPUTS = 2000;
const IMAGE_EXT = /\.(png|jpe?g|gif|svg|webp|bmp)$/i;

/** Apply carriage returns and backspaces the way a terminal would. */
export function fixConsole(text) {
    let t = text.replace(/\r\n/g, "\n");
    // A bare \r followed by more text on the line rewrites it (progress bars).
    t = t.replace(/^.*\r(?=[^\n\r])/gm, "");
    for (let i = 0; i < 1000 && /[^\n]\x08/.test(t); i++) {
        t = t.replace(/[^\n]\x08/g, "");
    }
    return t;
}

function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) {
        e.className = className;
    }
    if (text !== undefined) {
        e.textContent = text;
    }
    return e;
}

function formatSize(n) {
    if (n < 1024) {
        return `${n} B`;
    }
    if (n < 1024 * 1024) {
        return `${(n / 1024).toFixed(1)} KiB`;
    }
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

export class OutputArea {
    /**
     * @param {HTMLElement} outputEl where outputs go
     * @param {HTMLElement} filesEl where links to written files go
     * @param {object} server the Server, for file and KaTeX URLs
     */
    constructor(outputEl, filesEl, server) {
        this.outputEl = outputEl;
        this.filesEl = filesEl;
        this.server = server;
        this.reset();
    }

    /** Forget everything shown; called before each run. */
    reset() {
        this.outputEl.textContent = "";
        this.filesEl.textContent = "";
        this.filesEl.hidden = true;
        this.displays = new Map(); // display_id -> [wrapper elements]
        this.clearPending = false;
        this.lastStream = null; // {name, text, el}
        this.streamChars = 0;
        this.truncated = false;
        this.files = new Map(); // path -> list item
        this.inputs = [];
        this.setState("idle");
    }

    setState(state) {
        this.state = state;
        this.outputEl.dataset.state = state;
    }

    /** Remove shown outputs (clear_output), keeping display ids working. */
    clear() {
        this.outputEl.textContent = "";
        this.lastStream = null;
        this.streamChars = 0;
        this.clearPending = false;
        for (const [id, list] of this.displays) {
            this.displays.set(id, list.filter((w) => w.isConnected));
        }
    }

    beforeOutput() {
        if (this.clearPending) {
            this.clear();
        }
    }

    append(node) {
        if (this.outputEl.childElementCount >= MAX_OUTPUTS) {
            this.truncate();
            return false;
        }
        this.outputEl.appendChild(node);
        return true;
    }

    truncate() {
        if (!this.truncated) {
            this.truncated = true;
            this.outputEl.appendChild(el("div", "sagecell-notice sagecell-notice-limit",
                "Output truncated: the browser stops showing more output for this run."));
        }
    }

    /** A message from the page itself (not the kernel), e.g. a lost connection. */
    notice(text, kind = "info") {
        const n = el("div", `sagecell-notice sagecell-notice-${kind}`, text);
        this.outputEl.appendChild(n);
        this.lastStream = null;
        return n;
    }

    stream(name, text) {
        this.beforeOutput();
        if (this.streamChars > MAX_STREAM_CHARS) {
            this.truncate();
            return;
        }
        this.streamChars += text.length;
        const s = this.lastStream;
        if (s && s.name === name && s.el.isConnected && s.el === this.outputEl.lastElementChild) {
            s.text += text;
            if (/[\r\x08]/.test(text) || s.pendingCR) {
                // A carriage return may rewrite earlier text: render it all again.
                s.ansi = new AnsiUp();
                s.ansi.use_classes = true;
                s.el.innerHTML = s.ansi.ansi_to_html(fixConsole(s.text));
                s.pendingCR = s.text.slice(s.text.lastIndexOf("\n") + 1).includes("\r");
            } else {
                s.el.insertAdjacentHTML("beforeend", s.ansi.ansi_to_html(text));
            }
            return;
        }
        const pre = el("pre", `sagecell-stream sagecell-${name === "stderr" ? "stderr" : "stdout"}`);
        if (!this.append(pre)) {
            return;
        }
        const ansi = new AnsiUp();
        ansi.use_classes = true;
        pre.innerHTML = ansi.ansi_to_html(fixConsole(text));
        const pendingCR = text.slice(text.lastIndexOf("\n") + 1).includes("\r");
        this.lastStream = { name, text, el: pre, ansi, pendingCR };
    }

    display(content, { register = true } = {}) {
        this.beforeOutput();
        const wrapper = renderBundle(content.data, content.metadata, this.server);
        if (content.execution_count !== undefined && content.execution_count !== null) {
            wrapper.classList.add("sagecell-execute-result");
        }
        this.lastStream = null;
        if (!this.append(wrapper)) {
            return;
        }
        const id = content.transient && content.transient.display_id;
        if (id && register) {
            wrapper.dataset.displayId = id;
            if (!this.displays.has(id)) {
                this.displays.set(id, []);
            }
            this.displays.get(id).push(wrapper);
        }
    }

    updateDisplay(content) {
        const id = content.transient && content.transient.display_id;
        const list = id ? this.displays.get(id) : undefined;
        if (!list) {
            return;
        }
        for (const old of list) {
            if (!old.isConnected) {
                continue;
            }
            const fresh = renderBundle(content.data, content.metadata, this.server);
            fresh.dataset.displayId = id;
            old.replaceWith(fresh);
            list[list.indexOf(old)] = fresh;
        }
    }

    error(content) {
        this.beforeOutput();
        const tb = content.traceback && content.traceback.length
            ? content.traceback.join("\n")
            : `${content.ename || "Error"}: ${content.evalue || ""}`;
        const pre = ansiElement("pre", tb, "sagecell-error");
        pre.dataset.ename = content.ename || "";
        this.lastStream = null;
        this.append(pre);
    }

    /** input(): a text box whose answer goes back as input_reply. */
    inputRequest(content, reply) {
        this.beforeOutput();
        const box = el("div", "sagecell-input-request");
        const label = el("label", "sagecell-input-prompt");
        const prompt = el("span", "", content.prompt || "");
        const field = el("input", "sagecell-input-field");
        field.type = content.password ? "password" : "text";
        field.autocomplete = "off";
        field.spellcheck = false;
        const send = el("button", "sagecell-input-send", "Send");
        send.type = "button";
        label.append(prompt, field);
        box.append(label, send);
        const submit = () => {
            if (field.disabled) {
                return;
            }
            const value = field.value;
            field.disabled = true;
            send.disabled = true;
            try {
                reply(value);
            } catch (e) {
                this.notice(`Could not send the input: ${e.message}`, "error");
                return;
            }
            const echo = el("pre", "sagecell-stream sagecell-stdout sagecell-input-echo",
                (content.prompt || "") + (content.password ? "••••••" : value) + "\n");
            box.replaceWith(echo);
        };
        field.addEventListener("keydown", (event) => {
            if (event.key === "Enter") {
                event.preventDefault();
                event.stopPropagation();
                submit();
            }
        });
        send.addEventListener("click", submit);
        this.lastStream = null;
        this.append(box);
        this.inputs.push(field);
        field.focus({ preventScroll: true });
    }

    /** The run ended: input boxes still open can no longer be answered. */
    finish(state = "done") {
        for (const field of this.inputs) {
            if (!field.disabled) {
                field.disabled = true;
                const box = field.closest(".sagecell-input-request");
                if (box) {
                    box.classList.add("sagecell-input-expired");
                    const send = box.querySelector("button");
                    if (send) {
                        send.disabled = true;
                    }
                }
            }
        }
        this.setState(state);
    }

    /** sagecell.files: links to (and previews of) files the code wrote. */
    showFiles(files) {
        if (!Array.isArray(files) || files.length === 0) {
            return;
        }
        let list = this.filesEl.querySelector("ul");
        if (!list) {
            this.filesEl.appendChild(el("div", "sagecell-sessionFilesTitle", "Files"));
            list = el("ul", "sagecell-file-list");
            this.filesEl.appendChild(list);
        }
        this.filesEl.hidden = false;
        for (const f of files) {
            if (!f || typeof f.path !== "string") {
                continue;
            }
            const item = el("li", "sagecell-file");
            item.dataset.path = f.path;
            const href = this.server.resolve(f.url || "") + (f.mtime ? `?v=${encodeURIComponent(f.mtime)}` : "");
            const a = el("a", "sagecell-file-link", f.path);
            a.href = href;
            a.download = f.path.split("/").pop();
            a.target = "_blank";
            a.rel = "noopener";
            item.appendChild(a);
            const meta = [];
            if (typeof f.size === "number") {
                meta.push(formatSize(f.size));
            }
            if (f.change) {
                meta.push(f.change);
            }
            if (meta.length) {
                item.appendChild(el("span", "sagecell-file-meta", ` (${meta.join(", ")})`));
            }
            if (IMAGE_EXT.test(f.path)) {
                const img = el("img", "sagecell-file-preview");
                img.alt = f.path;
                img.loading = "lazy";
                img.src = href;
                item.appendChild(img);
            }
            const old = this.files.get(f.path);
            if (old && old.isConnected) {
                old.replaceWith(item);
            } else {
                list.appendChild(item);
            }
            this.files.set(f.path, item);
        }
    }

    /** Route one iopub message. */
    handleIOPub(msg) {
        const type = msg.header.msg_type;
        const c = msg.content || {};
        switch (type) {
            case "stream":
                this.stream(c.name, c.text || "");
                break;
            case "display_data":
            case "execute_result":
                this.display(c);
                break;
            case "update_display_data":
                this.updateDisplay(c);
                break;
            case "clear_output":
                if (c.wait) {
                    this.clearPending = true;
                } else {
                    this.clear();
                }
                break;
            case "error":
                this.error(c);
                break;
            case "sagecell.files":
                this.showFiles(c.files);
                break;
            default:
                break;
        }
    }
}
