// One embedded cell: editor, buttons, status, uploads and output, wired to the
// kernel group it runs in.

import { createEditor } from "./editor.js";
import { LanguageChoice } from "./languages.js";
import { interactValues, setInteractValues } from "./interacts.js";
import { OutputArea } from "./output.js";
import { encodeZ } from "./permalink.js";

/** Names accepted in the `hide` option (SageMathCell's, plus ours). */
export const HIDEABLE = {
    editor: ".sagecell-editor",
    evalButton: ".sagecell-evalButton",
    language: ".sagecell-language",
    interrupt: ".sagecell-interrupt",
    files: ".sagecell-files",
    fileUpload: ".sagecell-files",
    permalink: ".sagecell-permalink",
    status: ".sagecell-status",
    output: ".sagecell-output",
    sessionFiles: ".sagecell-sessionFiles",
    sessionFilesTitle: ".sagecell-sessionFilesTitle",
    messages: ".sagecell-messages",
};

const STATUS_TEXT = {
    none: "not started",
    new: "not started",
    starting: "starting…",
    idle: "idle",
    busy: "busy",
    restarting: "restarting…",
    dead: "dead",
    disconnected: "disconnected",
    reconnecting: "connection lost, reconnecting…",
    unreachable: "server unreachable",
    closed: "closed",
};

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

function button(className, text, title) {
    const b = el("button", `sagecell-button ${className}`, text);
    b.type = "button";
    if (title) {
        b.title = title;
    }
    return b;
}

function closeReason(info) {
    const code = info.code ? `code ${info.code}` : "no code";
    return info.reason ? `${info.reason} (${code})` : `(${code})`;
}

export class Cell {
    /**
     * @param {object} opts
     * @param {HTMLElement} opts.inputEl element that holds the editor and buttons
     * @param {HTMLElement} opts.outputEl element that holds the output (may be inputEl)
     * @param {object} opts.options merged makeSagecell options
     * @param {import("./server.js").Server} opts.server
     * @param {import("./kernel.js").KernelGroup} opts.group
     */
    constructor({ inputEl, outputEl, options, server, group }) {
        this.options = options;
        this.server = server;
        this.group = group;
        this.inputEl = inputEl;
        this.outputEl = outputEl;
        this.runCounter = 0;
        this.currentMsgId = null;
        this.lastGeneration = 0;
        this.uploads = new Map(); // file name -> {file, kernelId, pending, item}
        this.destroyed = false;
        this.build();
        this.onStatus = (status) => this.showStatus(status);
        this.onNewKernel = (kernel) => this.reupload(kernel);
        group.listeners.add(this.onStatus);
        group.newKernelListeners.add(this.onNewKernel);
        group.cells.add(this);
        this.showStatus(group.status);
    }

    build() {
        const o = this.options;
        const root = el("div", "sagecell-tw sagecell-input-elements");
        this.root = root;
        this.editorBox = el("div", "sagecell-editor");
        root.appendChild(this.editorBox);
        this.editor = createEditor(o.editor, this.editorBox, o.code || "", () => this.evaluate());

        const controls = el("div", "sagecell-controls");
        this.evalButton = button("sagecell-evalButton", o.evalButtonText || "Evaluate",
            "Run the code (Shift+Enter)");
        this.evalButton.addEventListener("click", () => this.evaluate());
        this.languages = new LanguageChoice(o, this.server, this.group);
        this.interruptButton = button("sagecell-interrupt", "Interrupt", "Stop the running code");
        this.interruptButton.disabled = true;
        this.interruptButton.addEventListener("click", () => this.interrupt());

        const files = el("span", "sagecell-files");
        this.fileInput = el("input", "sagecell-file-input");
        this.fileInput.type = "file";
        this.fileInput.multiple = true;
        this.fileInput.hidden = true;
        this.fileInput.addEventListener("change", () => {
            this.upload(this.fileInput.files);
            this.fileInput.value = "";
        });
        const uploadButton = button("sagecell-upload-button", "Upload files…",
            "Send files to the session (or drop them on the cell)");
        uploadButton.addEventListener("click", () => this.fileInput.click());
        files.append(uploadButton, this.fileInput);

        this.permalinkButton = button("sagecell-permalink", "Share", "Make a link to this code");
        this.permalinkButton.addEventListener("click", () => this.share());

        this.statusEl = el("span", "sagecell-status");
        this.statusEl.setAttribute("role", "status");
        this.statusEl.setAttribute("aria-live", "polite");

        controls.append(this.evalButton, this.languages.element, this.interruptButton, files,
            this.permalinkButton, this.statusEl);
        root.appendChild(controls);

        this.uploadList = el("ul", "sagecell-uploads sagecell-files");
        this.uploadList.hidden = true;
        root.appendChild(this.uploadList);
        this.shareBox = el("div", "sagecell-permalink sagecell-permalink-box");
        this.shareBox.hidden = true;
        root.appendChild(this.shareBox);

        const outRoot = el("div", "sagecell-tw sagecell-output-elements");
        outRoot.hidden = true;
        this.outRoot = outRoot;
        this.outputBox = el("div", "sagecell-output");
        this.outputBox.setAttribute("aria-live", "polite");
        this.filesBox = el("div", "sagecell-sessionFiles");
        outRoot.append(this.outputBox, this.filesBox);
        this.output = new OutputArea(this.outputBox, this.filesBox, this.server);

        // Drop files anywhere on the cell to upload them.
        if (!(o.hide || []).includes("files")) {
            root.addEventListener("dragover", (event) => {
                if (event.dataTransfer && Array.from(event.dataTransfer.types).includes("Files")) {
                    event.preventDefault();
                    event.dataTransfer.dropEffect = "copy";
                    root.classList.add("sagecell-dragover");
                }
            });
            root.addEventListener("dragleave", () => root.classList.remove("sagecell-dragover"));
            root.addEventListener("drop", (event) => {
                root.classList.remove("sagecell-dragover");
                if (event.dataTransfer && event.dataTransfer.files.length) {
                    event.preventDefault();
                    this.upload(event.dataTransfer.files);
                }
            });
        }

        for (const name of o.hide || []) {
            const selector = HIDEABLE[name];
            if (!selector) {
                continue;
            }
            for (const part of [root, outRoot]) {
                for (const node of part.querySelectorAll(selector)) {
                    node.classList.add("sagecell-hidden");
                }
                if (part.matches(selector)) {
                    part.classList.add("sagecell-hidden");
                }
            }
        }

        this.inputEl.textContent = "";
        this.inputEl.classList.add("sagecell");
        this.inputEl.appendChild(root);
        if (this.outputEl !== this.inputEl) {
            this.outputEl.classList.add("sagecell");
        }
        this.outputEl.appendChild(outRoot);
    }

    showStatus(status) {
        const s = status || "none";
        this.statusEl.dataset.status = s;
        this.root.dataset.status = s;
        this.statusEl.textContent = `Kernel: ${STATUS_TEXT[s] || s}`;
        this.interruptButton.disabled = s !== "busy";
    }

    getCode() {
        return this.editor.getCode();
    }

    setCode(code) {
        this.editor.setCode(code);
    }

    /** Run the editor's code; resolves when the request was sent (not finished). */
    async evaluate() {
        if (this.destroyed) {
            return;
        }
        const source = this.getCode();
        const out = this.output;
        const run = ++this.runCounter;
        this.currentMsgId = null;
        out.reset();
        this.outRoot.hidden = false;
        out.setState("starting");
        let kernel;
        let code;
        try {
            code = await this.languages.wrap(source);
            kernel = await this.group.ensure();
            await this.pendingUploads();
        } catch (e) {
            if (run === this.runCounter) {
                out.notice(e.message || String(e), "error");
                out.finish("failed");
            }
            return;
        }
        if (run !== this.runCounter || this.destroyed) {
            return;
        }
        if (this.lastGeneration && this.lastGeneration !== this.group.generation) {
            out.notice("A new session was started: the previous one had ended, so " +
                "earlier variables are gone.", "info");
        }
        this.lastGeneration = this.group.generation;
        out.setState("running");
        let msgId = null;
        let sawBusy = false;
        const isCurrent = () => msgId !== null && this.currentMsgId === msgId;
        const handler = {
            iopub: (msg) => {
                if (!isCurrent()) {
                    return;
                }
                const type = msg.header.msg_type;
                if (type === "status") {
                    const state = msg.content.execution_state;
                    const ours = msg.parent_header && msg.parent_header.msg_id === msgId;
                    const running = out.state === "running";
                    if (state === "busy" && ours) {
                        sawBusy = true;
                    } else if (state === "dead") {
                        if (out.state !== "dead") {
                            out.notice("The session has ended. Evaluate again to start a new one.",
                                "error");
                        }
                        out.finish("dead");
                    } else if (running && (state === "restarting" || state === "autorestarting" ||
                        (state === "starting" && sawBusy && !ours))) {
                        out.notice("The kernel restarted (it may have crashed or hit a " +
                            "limit), so variables from before are gone.", "error");
                        out.finish("restarted");
                    } else if (state === "idle" && ours) {
                        out.finish("done");
                    }
                    return;
                }
                out.handleIOPub(msg);
            },
            stdin: (msg) => {
                if (!isCurrent() || msg.header.msg_type !== "input_request") {
                    return;
                }
                out.inputRequest(msg.content, (value) => kernel.inputReply(value, msg.header));
            },
            shell: (msg) => {
                if (!isCurrent() || msg.header.msg_type !== "execute_reply") {
                    return;
                }
                const c = msg.content || {};
                if (c.status === "error" && c.ename === "BadRequest" && !sawBusy) {
                    // The server refused the request; the kernel never saw it.
                    out.error(c);
                    out.finish("failed");
                } else if (c.status === "aborted") {
                    out.notice("Not run: an earlier computation in this session failed.", "info");
                    out.finish("done");
                }
            },
            reconnecting: () => {
                if (isCurrent() && (out.state === "running" || out.state === "starting")) {
                    out.notice("The connection to the server was lost; reconnecting…", "info");
                }
            },
            reconnected: () => {
                if (isCurrent() && (out.state === "running" || out.state === "starting")) {
                    out.notice("Reconnected: the output produced meanwhile follows.", "info");
                }
            },
            closed: (info) => {
                if (!isCurrent() || info.intentional || out.state === "dead") {
                    return;
                }
                out.notice(`The connection to the server closed: ${closeReason(info)}. ` +
                    "Evaluate again to start a new session.", "error");
                if (out.state === "running" || out.state === "starting") {
                    out.finish("disconnected");
                }
            },
        };
        try {
            msgId = kernel.execute(code, handler);
            this.currentMsgId = msgId;
        } catch (e) {
            out.notice(`Could not send the code: ${e.message}`, "error");
            out.finish("failed");
        }
    }

    async interrupt() {
        const kernel = this.group.kernel;
        if (!kernel) {
            return;
        }
        try {
            await kernel.interrupt();
        } catch (e) {
            this.output.notice(e.message || String(e), "error");
        }
    }

    uploadItem(name) {
        const li = el("li", "sagecell-upload");
        li.dataset.name = name;
        this.uploadList.hidden = false;
        this.uploadList.appendChild(li);
        return li;
    }

    setUploadState(rec, state, text) {
        rec.item.dataset.state = state;
        rec.item.textContent = `${rec.file.name}: ${text}`;
    }

    sendUpload(rec, kernel) {
        rec.kernelId = kernel.id;
        this.setUploadState(rec, "uploading", "uploading…");
        rec.pending = this.server.uploadFile(kernel.id, rec.file.name, rec.file).then(
            () => this.setUploadState(rec, "done", "uploaded"),
            (e) => {
                rec.kernelId = null;
                this.setUploadState(rec, "failed", e.message || String(e));
            },
        );
        return rec.pending;
    }

    /** Send files to the session's working directory (starting one if needed). */
    async upload(fileList) {
        const files = Array.from(fileList || []);
        if (!files.length) {
            return;
        }
        const recs = files.map((file) => {
            const old = this.uploads.get(file.name);
            if (old) {
                old.item.remove();
            }
            const rec = { file, kernelId: null, pending: null, item: this.uploadItem(file.name) };
            this.uploads.set(file.name, rec);
            this.setUploadState(rec, "waiting", "waiting for a session…");
            return rec;
        });
        let kernel;
        try {
            await this.languages.ready();
            kernel = await this.group.ensure();
        } catch (e) {
            for (const rec of recs) {
                this.setUploadState(rec, "failed", e.message || String(e));
            }
            return;
        }
        await Promise.all(recs.map((rec) =>
            rec.kernelId === kernel.id ? rec.pending : this.sendUpload(rec, kernel)));
    }

    /** A new kernel has an empty directory: send it this cell's files again. */
    reupload(kernel) {
        const sends = [];
        for (const rec of this.uploads.values()) {
            if (rec.kernelId !== kernel.id) {
                sends.push(this.sendUpload(rec, kernel));
            }
        }
        return Promise.all(sends);
    }

    pendingUploads() {
        const pending = [];
        for (const cell of this.group.cells) {
            for (const rec of cell.uploads.values()) {
                if (rec.pending) {
                    pending.push(rec.pending);
                }
            }
        }
        return Promise.all(pending);
    }

    async share() {
        const code = this.getCode();
        const language = this.languages.language;
        const lang = `&lang=${encodeURIComponent(language)}`;
        const box = this.shareBox;
        box.textContent = "";
        box.hidden = false;
        const add = (label, url) => {
            const row = el("div", "sagecell-permalink-row");
            const a = el("a", "sagecell-permalink-link", label);
            a.href = url;
            a.target = "_blank";
            a.rel = "noopener";
            const field = el("input", "sagecell-permalink-url");
            field.readOnly = true;
            field.value = url;
            field.addEventListener("focus", () => field.select());
            row.append(a, field);
            box.appendChild(row);
        };
        try {
            add("Permalink", `${this.server.base}/?z=${await encodeZ(code)}${lang}`);
        } catch (e) {
            add("Permalink", `${this.server.base}/?c=${encodeURIComponent(code)}${lang}`);
        }
        try {
            const answer = await this.server.makePermalink(code, language,
                await interactValues(this.outputBox).catch(() => []));
            const id = answer && (answer.query || answer.id);
            if (id) {
                add("Short link", `${this.server.base}/?q=${encodeURIComponent(id)}`);
            }
        } catch (e) {
            // Short links are optional; the ?z= link above always works.
        }
    }

    /** The cellInfo object handed to the page. */
    info() {
        const cell = this;
        return {
            inputLocation: this.inputEl,
            outputLocation: this.outputEl,
            cell: this,
            evaluate: () => this.evaluate(),
            interrupt: () => this.interrupt(),
            getCode: () => this.getCode(),
            setCode: (code) => this.setCode(code),
            getLanguage: () => this.languages.language,
            setLanguage: (language) => this.languages.setLanguage(language),
            /** Set a permalink's interact values on the controls once the run shows them. */
            setInteracts: (values) => setInteractValues(this.outputBox, values),
            upload: (files) => this.upload(files),
            get kernelId() {
                return cell.group.kernel ? cell.group.kernel.id : null;
            },
            get status() {
                return cell.group.status;
            },
        };
    }

    destroy() {
        this.destroyed = true;
        this.group.listeners.delete(this.onStatus);
        this.group.newKernelListeners.delete(this.onNewKernel);
        this.group.cells.delete(this);
        this.editor.destroy();
        this.root.remove();
        this.outRoot.remove();
        this.inputEl.classList.remove("sagecell");
        this.outputEl.classList.remove("sagecell");
    }
}
