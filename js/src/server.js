// The HTTP side of the Jupyter Server kernel API, as sagecell_tw serves it.
//
// Every URL is built from one base URL (the server root, without a trailing
// slash), so a page on any origin can talk to the server its script came from.

import { uuid } from "./ids.js";

/** Work out the server root from the URL of this script. */
export function baseFromScriptSrc(src, documentBase) {
    const u = new URL(src, documentBase);
    // ".../static/embed.js" and ".../embedded_sagecell.js" both live under the root.
    let path = u.pathname.replace(/[^/]*$/, "");
    path = path.replace(/static\/$/, "");
    return (u.origin + path).replace(/\/+$/, "");
}

/** The base URL of the server, from the <script src> that loaded this bundle. */
export function detectServerURL(currentScript) {
    if (currentScript && currentScript.src) {
        return baseFromScriptSrc(currentScript.src, document.baseURI);
    }
    const scripts = document.querySelectorAll("script[src]");
    for (const s of scripts) {
        if (/(?:^|\/)(?:embed|embedded_sagecell)\.js(?:[?#]|$)/.test(s.src)) {
            return baseFromScriptSrc(s.src, document.baseURI);
        }
    }
    return location.origin;
}

/** An error a person can read: it says what failed and where. */
export class ServerError extends Error {
    constructor(message, { status = 0, reason = "" } = {}) {
        super(message);
        this.name = "ServerError";
        this.status = status;
        this.reason = reason;
    }
}

async function errorFromResponse(what, response) {
    let detail = "";
    try {
        const text = await response.text();
        try {
            const body = JSON.parse(text);
            detail = body.message || body.reason || body.error || "";
        } catch (e) {
            detail = text.slice(0, 300);
        }
    } catch (e) {
        // No body to read; the status says enough.
    }
    const status = `${response.status} ${response.statusText || ""}`.trim();
    return new ServerError(
        `${what} failed (${status})${detail ? ": " + detail : ""}`,
        { status: response.status, reason: detail },
    );
}

export class Server {
    /**
     * @param {string} baseURL server root
     * @param {string} [token] optional Jupyter-style token (public servers need none)
     */
    constructor(baseURL, token = "") {
        this.base = String(baseURL).replace(/\/+$/, "");
        this.token = token || "";
    }

    /** Absolute URL for a path relative to the server root ("/api/..."). */
    url(path) {
        if (/^[a-z]+:\/\//i.test(path)) {
            return path;
        }
        return this.base + (path.startsWith("/") ? path : "/" + path);
    }

    /**
     * A URL the server wrote (a file's "url"): an absolute path already holds
     * the server's path prefix (--base-url), so it is taken from the origin.
     */
    resolve(href) {
        return new URL(href, this.base + "/").href;
    }

    /** ws:// or wss:// URL for a path, following the base URL's scheme. */
    wsURL(path) {
        return this.url(path).replace(/^http(s?):\/\//i, "ws$1://");
    }

    async request(what, method, path, { body, headers, keepalive } = {}) {
        let response;
        if (this.token) {
            headers = { ...(headers || {}), Authorization: `token ${this.token}` };
        }
        try {
            response = await fetch(this.url(path), {
                method,
                body,
                headers,
                keepalive,
                mode: "cors",
                credentials: "omit",
                cache: "no-store",
            });
        } catch (e) {
            throw new ServerError(
                `Cannot reach the server at ${this.base} (${what}: ${e.message || e}). ` +
                    "It may be down, or your network blocks it.",
            );
        }
        if (!response.ok) {
            throw await errorFromResponse(what, response);
        }
        return response;
    }

    async startKernel(name = "python3") {
        const response = await this.request(
            "starting a kernel",
            "POST",
            "/api/kernels",
            {
                body: JSON.stringify({ name }),
                headers: { "Content-Type": "application/json" },
            },
        );
        const model = await response.json();
        if (!model || typeof model.id !== "string") {
            throw new ServerError("The server answered POST /api/kernels without a kernel id");
        }
        return model;
    }

    /** The kernel's WebSocket; `lastMsgId`: the server replays what came after it (a reconnect). */
    channelsURL(kernelId, sessionId = uuid(), lastMsgId = null) {
        const token = this.token ? `&token=${encodeURIComponent(this.token)}` : "";
        const last = lastMsgId ? `&last_msg_id=${encodeURIComponent(lastMsgId)}` : "";
        const query = `session_id=${encodeURIComponent(sessionId)}${token}${last}`;
        return this.wsURL(`/api/kernels/${encodeURIComponent(kernelId)}/channels?${query}`);
    }

    async interruptKernel(kernelId) {
        await this.request(
            "interrupting the kernel",
            "POST",
            `/api/kernels/${encodeURIComponent(kernelId)}/interrupt`,
        );
    }

    /** End a kernel; with keepalive it may outlive the page (unload). */
    deleteKernel(kernelId, { keepalive = false } = {}) {
        return this.request(
            "ending the kernel",
            "DELETE",
            `/api/kernels/${encodeURIComponent(kernelId)}`,
            { keepalive },
        );
    }

    fileURL(kernelId, path) {
        const encoded = String(path).split("/").map(encodeURIComponent).join("/");
        return this.url(`/api/kernels/${encodeURIComponent(kernelId)}/files/${encoded}`);
    }

    async uploadFile(kernelId, path, blob) {
        const response = await this.request(
            `uploading ${path}`,
            "PUT",
            this.fileURL(kernelId, path),
            {
                body: blob,
                headers: { "Content-Type": "application/octet-stream" },
            },
        );
        try {
            return await response.json();
        } catch (e) {
            return {};
        }
    }

    async listFiles(kernelId) {
        const response = await this.request(
            "listing files",
            "GET",
            `/api/kernels/${encodeURIComponent(kernelId)}/files/`,
        );
        return (await response.json()).files || [];
    }

    /** The kernels the server runs (GET /api/kernelspecs), its default first. */
    async kernelNames() {
        const response = await this.request("asking which kernels the server runs", "GET",
            "/api/kernelspecs");
        const body = await response.json();
        const names = Object.keys((body && body.kernelspecs) || {});
        if (body && names.includes(body.default)) {
            names.splice(names.indexOf(body.default), 1);
            names.unshift(body.default);
        }
        if (!names.length) {
            throw new ServerError("The server lists no kernels (GET /api/kernelspecs)");
        }
        return names;
    }

    /** A stored permalink: GET /permalink?q=ID -> [code, language, interacts]. */
    async getPermalink(id) {
        const response = await this.request(
            "loading the permalink",
            "GET",
            `/permalink?q=${encodeURIComponent(id)}`,
        );
        return response.json();
    }

    /** Store code (and interact values) for a short link; the answer carries the id as "query". */
    async makePermalink(code, language = "python", interacts = []) {
        const body = new URLSearchParams({ code, language, interacts: JSON.stringify(interacts) });
        const response = await this.request("making a permalink", "POST", "/permalink", {
            body,
        });
        return response.json();
    }
}
