// Turning Jupyter MIME bundles into DOM nodes, without ever running the
// kernel's HTML or JavaScript in the embedding page's origin.

import { AnsiUp } from "ansi_up";

import { loadModule } from "./lazy.js";

import { localThreejs } from "./threejs.js";
import { WIDGET_MIME, widgetElement } from "./widgetviews.js";

/**
 * MIME types we show, best first; the first one present wins. LaTeX before
 * HTML: what offers both (Sage's show() and typeset results: HTML with
 * MathJax delimiters, for a notebook that runs MathJax) is typeset here with
 * KaTeX; the sandboxed frame that shows HTML has no math renderer.
 */
export const MIME_PRIORITY = [
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/svg+xml",
    "text/latex",
    "text/html",
    "text/markdown",
    "text/plain",
];

const MAX_FRAME_HEIGHT = 5000;

/** Tracebacks and streams with ANSI colour codes -> safe HTML (escaped). */
export function ansiToHtml(text) {
    const au = new AnsiUp();
    au.use_classes = true;
    au.escape_html = true;
    return au.ansi_to_html(text);
}

export function ansiElement(tag, text, className) {
    const el = document.createElement(tag);
    el.className = className;
    el.innerHTML = ansiToHtml(text);
    return el;
}

function asText(value) {
    return Array.isArray(value) ? value.join("") : String(value);
}

function imageSize(img, mime, metadata) {
    const md = (metadata && (metadata[mime] || metadata)) || {};
    if (md.width) {
        img.width = md.width;
    }
    if (md.height) {
        img.height = md.height;
    }
}

// Sandboxed frames report their content height; match a report to its frame.
const frames = new Map(); // frame id -> iframe
let frameCounter = 0;
let listening = false;

function onFrameMessage(event) {
    const data = event.data;
    if (!data || typeof data !== "object" || typeof data.sagecellFrame !== "string") {
        return;
    }
    const frame = frames.get(data.sagecellFrame);
    if (!frame) {
        return;
    }
    if (!frame.isConnected) {
        frames.delete(data.sagecellFrame);
        return;
    }
    if (event.source !== frame.contentWindow) {
        return;
    }
    const h = Number(data.height);
    if (Number.isFinite(h) && h >= 0) {
        frame.style.height = Math.min(Math.ceil(h), MAX_FRAME_HEIGHT) + "px";
    }
}

function frameDocument(html, id, head = "") {
    // The reporter runs in the frame's own opaque origin (no allow-same-origin),
    // so it can tell us its height and nothing else.
    const reporter = `(function(){var id=${JSON.stringify(id)},last=-1;
function send(){var d=document.documentElement;var h=d.getBoundingClientRect().height;
if(d.scrollWidth>d.clientWidth){h+=18;}if(h!==last){last=h;parent.postMessage({sagecellFrame:id,height:h},"*");}}
addEventListener("load",send);document.addEventListener("DOMContentLoaded",function(){send();
if(window.ResizeObserver){new ResizeObserver(send).observe(document.documentElement);}});
setTimeout(send,50);setTimeout(send,500);})();`;
    return "<!DOCTYPE html><html><head><meta charset=\"utf-8\">" +
        "<style>html{height:auto;overflow-y:hidden}body{margin:0;padding:2px;" +
        "font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:14px}" +
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 6px}</style>" +
        `<script>${reporter}</script>${head}</head><body>${html}</body></html>`;
}

/**
 * HTML from the kernel, isolated in a sandboxed frame (scripts, but no same
 * origin); `head` goes in the frame's head (our stylesheets).
 */
export function sandboxedFrame(html, head = "") {
    if (!listening) {
        window.addEventListener("message", onFrameMessage);
        listening = true;
    }
    frameCounter += 1;
    const id = `sagecell-frame-${frameCounter}-${Math.random().toString(36).slice(2)}`;
    const iframe = document.createElement("iframe");
    iframe.className = "sagecell-html-frame";
    iframe.setAttribute("sandbox", "allow-scripts");
    iframe.setAttribute("referrerpolicy", "no-referrer");
    iframe.setAttribute("title", "HTML output");
    iframe.style.height = "20px";
    iframe.srcdoc = frameDocument(html, id, head);
    frames.set(id, iframe);
    return iframe;
}

const KATEX_CSS = "/static/katex/katex.min.css"; // the page's link, and the HTML frame's
let katexCssLoaded = false;

function ensureKatexCss(server) {
    if (katexCssLoaded || !server) {
        return;
    }
    katexCssLoaded = true;
    if (document.querySelector("link[data-sagecell-katex]")) {
        return;
    }
    const link = document.createElement("link");
    link.rel = "stylesheet";
    link.href = server.url(KATEX_CSS);
    link.setAttribute("data-sagecell-katex", "");
    document.head.appendChild(link);
}

const KATEX_DELIMITERS = [
    { left: "$$", right: "$$", display: true },
    { left: "\\[", right: "\\]", display: true },
    { left: "\\begin{equation}", right: "\\end{equation}", display: true },
    { left: "\\begin{equation*}", right: "\\end{equation*}", display: true },
    { left: "\\begin{align}", right: "\\end{align}", display: true },
    { left: "\\begin{align*}", right: "\\end{align*}", display: true },
    { left: "\\begin{gather}", right: "\\end{gather}", display: true },
    { left: "$", right: "$", display: false },
    { left: "\\(", right: "\\)", display: false },
];
const KATEX_OPTIONS = { delimiters: KATEX_DELIMITERS, throwOnError: false, trust: false };

// What may hold math in MathJax's delimiters: worth a look for formulas.
const MATH_HINT = /\\\(|\\\[|\$|\\begin\{/;

/** Typeset the math in el with KaTeX, loaded on the page's first LaTeX output. */
export async function typeset(el, server) {
    ensureKatexCss(server);
    const { renderMathInElement } = await loadModule(server, "katex");
    renderMathInElement(el, KATEX_OPTIONS);
}

export function latexElement(tex, server) {
    const div = document.createElement("div");
    div.className = "sagecell-latex";
    div.textContent = MATH_HINT.test(tex) ? tex : `$$${tex}$$`;
    typeset(div, server).catch(() => {
        div.textContent = tex;
    });
    return div;
}

/**
 * HTML whose formulas are typeset with KaTeX, with the stylesheet they need
 * in the frame: {html, head}. Sage's html() and show() write formulas in
 * MathJax's delimiters (\( \), $ $, \[ \]) for a page that runs MathJax,
 * as SageMathCell's does; the frame that shows HTML runs nothing of ours, so
 * they are typeset here, in an inert copy (a DOMParser document runs no
 * script and loads nothing), with KaTeX loaded on the page's first formula.
 * HTML with no formula is left as it came.
 */
export async function typesetHtml(html, server) {
    if (!MATH_HINT.test(html) || !server) {
        return { html, head: "" };
    }
    const doc = new DOMParser().parseFromString(html, "text/html");
    try {
        const { renderMathInElement } = await loadModule(server, "katex");
        renderMathInElement(doc.body, KATEX_OPTIONS);
    } catch (e) {
        return { html, head: "" };
    }
    if (!doc.body.querySelector(".katex")) {
        return { html, head: "" };
    }
    const css = server.url(KATEX_CSS).replace(/["<>&]/g, encodeURIComponent);
    return {
        html: doc.head.innerHTML + doc.body.innerHTML,
        head: `<link rel="stylesheet" href="${css}">`,
    };
}

/**
 * The DOM node for a display_data / execute_result bundle.
 * application/javascript is never run: only a note says it was skipped.
 */
export function renderBundle(data, metadata, server) {
    data = data || {};
    const mime = MIME_PRIORITY.find((m) => data[m] !== undefined && data[m] !== null);
    const wrapper = document.createElement("div");
    wrapper.className = "sagecell-display";
    const widget = widgetElement(data); // an ipywidget that a kernel on this page has
    if (widget) {
        wrapper.dataset.mime = WIDGET_MIME;
        wrapper.appendChild(widget);
        return wrapper;
    }
    if (!mime) {
        const note = document.createElement("div");
        note.className = "sagecell-note";
        const types = Object.keys(data).join(", ") || "nothing";
        note.textContent = data["application/javascript"] !== undefined
            ? "(JavaScript output is not run here.)"
            : `(Output of type ${types} cannot be shown here.)`;
        wrapper.appendChild(note);
        return wrapper;
    }
    wrapper.dataset.mime = mime;
    const value = data[mime];
    if (mime === "image/png" || mime === "image/jpeg" || mime === "image/gif") {
        const img = document.createElement("img");
        img.className = "sagecell-image";
        img.alt = asText(data["text/plain"] || "image output");
        img.src = `data:${mime};base64,${asText(value).replace(/\s/g, "")}`;
        imageSize(img, mime, metadata);
        wrapper.appendChild(img);
    } else if (mime === "image/svg+xml") {
        // An SVG shown as an <img> never runs its scripts and loads nothing else.
        const img = document.createElement("img");
        img.className = "sagecell-image sagecell-svg";
        img.alt = "SVG output";
        img.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(asText(value));
        imageSize(img, mime, metadata);
        wrapper.appendChild(img);
    } else if (mime === "text/html") {
        const html = localThreejs(asText(value), server);
        if (MATH_HINT.test(html)) {
            // The frame comes once KaTeX has typeset the formulas (or failed to).
            typesetHtml(html, server).then((shown) => wrapper.appendChild(sandboxedFrame(shown.html, shown.head)));
        } else {
            wrapper.appendChild(sandboxedFrame(html, ""));
        }
    } else if (mime === "text/latex") {
        wrapper.appendChild(latexElement(asText(value), server));
    } else {
        // text/markdown is shown as its source; text/plain may carry ANSI colours.
        wrapper.appendChild(ansiElement("pre", asText(value), "sagecell-text"));
    }
    return wrapper;
}
