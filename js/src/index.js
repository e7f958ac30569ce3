// The global `sagecell` object: SageMathCell's embedding API
// (makeSagecell, deleteSagecell, templates, init) on top of the standard
// Jupyter kernel API of a sagecell_tw server.

import css from "./embed.css";
import { Cell } from "./cell.js";
import { KernelGroup } from "./kernel.js";
import { ALL_LANGUAGES } from "./languages.js";
import { codeFromQuery, decodeZ, encodeZ } from "./permalink.js";
import { detectServerURL, Server } from "./server.js";

// Read while this script is being run: afterwards currentScript is null.
const scriptURL = detectServerURL(document.currentScript);

const sagecell = window.sagecell || {};
window.sagecell = sagecell;
window.singlecell = sagecell; // SageMathCell kept this alias too

if (!sagecell.serverURL) {
    sagecell.serverURL = scriptURL;
}

const groups = new Map(); // "server base|link key" -> KernelGroup shared by linked cells
const cells = new Set();
let unlinkedCounter = 0;

function injectStyle() {
    if (document.getElementById("sagecell-tw-style")) {
        return;
    }
    const style = document.createElement("style");
    style.id = "sagecell-tw-style";
    style.textContent = css;
    (document.head || document.documentElement).appendChild(style);
}

/** Strip blank edges and common indentation, so code can be indented in HTML. */
export function dedent(text) {
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    while (lines.length && !lines[0].trim()) {
        lines.shift();
    }
    while (lines.length && !lines[lines.length - 1].trim()) {
        lines.pop();
    }
    let indent = Infinity;
    for (const line of lines) {
        if (line.trim()) {
            indent = Math.min(indent, line.match(/^[ \t]*/)[0].length);
        }
    }
    if (!Number.isFinite(indent)) {
        indent = 0;
    }
    return lines.map((line) => line.slice(indent)).join("\n");
}

function codeFromElement(input, args) {
    if (args.codeLocation !== undefined) {
        const loc = typeof args.codeLocation === "string"
            ? document.querySelector(args.codeLocation)
            : args.codeLocation;
        return loc ? loc.textContent : "";
    }
    const script = input.querySelector(":scope > script");
    if (script) {
        return script.textContent;
    }
    if (input.tagName === "TEXTAREA") {
        return input.value;
    }
    return input.textContent;
}

/** A cell's own language: `data-lang` on its element or on its code's <script>. */
function languageOfElement(input) {
    const script = input.querySelector(":scope > script[data-lang]");
    return input.getAttribute("data-lang") || (script && script.getAttribute("data-lang")) || null;
}

function resolve(location) {
    if (typeof location === "string") {
        return Array.from(document.querySelectorAll(location));
    }
    if (location instanceof Element) {
        return [location];
    }
    if (location && typeof location.length === "number") {
        return Array.from(location); // a NodeList or jQuery object
    }
    return [];
}

const templates = {
    minimal: { editor: "textarea-readonly", hide: ["editor", "files", "permalink"] },
    restricted: { editor: "codemirror-readonly", hide: ["files", "permalink"] },
};

function mergeOptions(args) {
    const template = args.template || {};
    const merged = {
        editor: "codemirror",
        evalButtonText: "Evaluate",
        replaceOutput: true,
        ...template,
        ...args,
    };
    merged.hide = [...(template.hide || []), ...(args.hide || [])];
    if (merged.linked) {
        merged.hide.push("permalink");
    }
    return merged;
}

function groupFor(server, options, callKey) {
    let key;
    if (options.linked || options.linkKey !== undefined) {
        key = `link:${options.linkKey !== undefined ? options.linkKey : "default"}`;
    } else if (callKey) {
        key = callKey;
    } else {
        unlinkedCounter += 1;
        key = `cell:${unlinkedCounter}`;
    }
    const full = `${server.base}|${key}`;
    let group = groups.get(full);
    if (!group) {
        // The kernel is chosen once the server's kernels are known (languages.js).
        group = new KernelGroup(server, full, options.kernelName || null);
        groups.set(full, group);
    }
    return group;
}

function makeOne(input, args, cellInfo) {
    if (input.classList.contains("sagecell") && input.querySelector(".sagecell-tw")) {
        return; // already a cell
    }
    const options = mergeOptions(args);
    if (options.code === undefined) {
        options.code = codeFromElement(input, args);
    }
    options.code = dedent(options.code || "");
    const lang = languageOfElement(input);
    if (lang) {
        options.defaultLanguage = lang;
    }
    let output = input;
    if (args.outputLocation !== undefined) {
        output = resolve(args.outputLocation)[0] || input;
    }
    if (input.tagName === "TEXTAREA") {
        const div = document.createElement("div");
        input.replaceWith(div);
        if (output === input) {
            output = div;
        }
        input = div;
    }
    const server = new Server(options.serverURL || sagecell.serverURL,
        options.token || sagecell.token);
    const group = groupFor(server, options);
    const cell = new Cell({ inputEl: input, outputEl: output, options, server, group });
    cells.add(cell);
    Object.assign(cellInfo, options, cell.info());
    if (options.autoeval && options.code) {
        cell.evaluate();
    }
    if (typeof options.callback === "function") {
        try {
            options.callback.call(cellInfo, cellInfo);
        } catch (e) {
            console.error("sagecell: the callback failed", e);
        }
    }
}

function make(args, cellInfo) {
    if (!args || args.inputLocation === undefined) {
        throw new Error("sagecell.makeSagecell: inputLocation is required");
    }
    injectStyle();
    const inputs = resolve(args.inputLocation);
    if (inputs.length === 0) {
        console.warn("sagecell.makeSagecell: nothing matches", args.inputLocation);
        return;
    }
    if (inputs.length === 1) {
        makeOne(inputs[0], args, cellInfo);
        return;
    }
    if (args.outputLocation !== undefined) {
        throw new Error("inputLocation must be unique if outputLocation is specified");
    }
    cellInfo.array = [];
    for (const input of inputs) {
        const info = {};
        makeOne(input, { ...args, inputLocation: input }, info);
        cellInfo.array.push(info);
    }
}

function whenReady(fn) {
    if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", fn, { once: true });
    } else {
        fn();
    }
}

/**
 * Make a cell from each element matching args.inputLocation. The returned
 * cellInfo is filled in at once, or when the document has loaded.
 */
function makeSagecell(args) {
    const cellInfo = {};
    const found = args && resolve(args.inputLocation).length > 0;
    if (document.readyState === "loading" && !found) {
        whenReady(() => make(args, cellInfo));
    } else {
        make(args, cellInfo);
    }
    return cellInfo;
}

function deleteSagecell(cellInfo) {
    if (!cellInfo) {
        return;
    }
    for (const info of cellInfo.array || [cellInfo]) {
        const cell = info.cell;
        if (!cell) {
            continue;
        }
        cell.destroy();
        cells.delete(cell);
        if (cell.group.cells.size === 0) {
            cell.group.shutdown();
            groups.delete(cell.group.key);
        }
    }
}

/** End every kernel this page started (on unload, or when asked). */
function shutdownAll({ keepalive = false } = {}) {
    const all = [];
    for (const group of groups.values()) {
        all.push(group.shutdown({ keepalive }));
    }
    return Promise.all(all);
}

window.addEventListener("pagehide", (event) => {
    if (!event.persisted) {
        shutdownAll({ keepalive: true });
    }
});

Object.assign(sagecell, {
    version: "0.1.0",
    // What `languages` may name; SageMathCell's list, less what this server has no
    // kernel for (Macaulay2, Octave, R).
    allLanguages: [...ALL_LANGUAGES],
    templates: { ...templates, ...(sagecell.templates || {}) },
    makeSagecell,
    deleteSagecell,
    init(callback) {
        whenReady(() => {
            if (typeof callback === "function") {
                callback();
            }
        });
    },
    // Form helpers of SageMathCell; cells here hold no <form>, so nothing moves.
    moveInputForm() {},
    restoreInputForm() {},
    shutdownAll,
    /** The cells on this page, as cellInfo objects. */
    cells: () => Array.from(cells, (c) => c.info()),
    /** Kernel groups: which kernel each set of linked cells uses. */
    sessions: () => Array.from(groups.values(), (g) => ({
        key: g.key,
        kernelId: g.kernel ? g.kernel.id : null,
        status: g.status,
        cells: g.cells.size,
    })),
    encodeZ,
    decodeZ,
    codeFromQuery: (search = location.search) =>
        codeFromQuery(search, new Server(sagecell.serverURL, sagecell.token)),
});
sagecell.makeSinglecell = makeSagecell;

if (typeof sagecell.onload === "function") {
    whenReady(() => sagecell.onload(sagecell));
}
