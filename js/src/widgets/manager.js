// The widget code, loaded on a kernel's first comm_open (see ../comms.js):
// ipywidgets' HTML manager and standard controls, with three changes that
// make them fit an embedded cell on someone else's page.
//  - Kernel-chosen HTML (HTML and HTMLMath widgets, descriptions that allow
//    HTML) is sanitized with DOMPurify before it reaches the page: no
//    <script>, event handler attribute or javascript: URL survives.
//  - The Output widget (what interact shows its function's output in) is ours:
//    it captures the output of the requests the kernel names and shows it
//    with the cell's own output code, so HTML stays in the sandboxed frame
//    and plots are images, as in the cell.
//  - Only ipywidgets 8 (widget protocol 2) is spoken: the manager's copies
//    of ipywidgets 7 are left out of the bundle (build.mjs).

import "@jupyter-widgets/controls/css/widgets.css";
import "./widgets.css";

import * as base from "@jupyter-widgets/base";
import * as controls from "@jupyter-widgets/controls";
import { HTMLManager } from "@jupyter-widgets/html-manager/lib/htmlmanager.js";
import * as outputBase from "@jupyter-widgets/output";
import DOMPurify from "dompurify";

/** Kernel HTML as a fragment with nothing that runs. */
function sanitized(html) {
    return DOMPurify.sanitize(String(html === null || html === undefined ? "" : html),
        { RETURN_DOM_FRAGMENT: true });
}

class HTMLView extends controls.HTMLView {
    update() {
        this.content.replaceChildren(sanitized(this.model.get("value")));
        return controls.StringView.prototype.update.call(this);
    }
}

class HTMLMathView extends controls.HTMLMathView {
    update() {
        this.content.replaceChildren(sanitized(this.model.get("value")));
        this.typeset(this.content);
        return controls.StringView.prototype.update.call(this);
    }
}

/**
 * What an Output widget shows: the iopub messages of the requests it captured
 * (or its `outputs` state, set in the kernel), since its last clear.
 */
class OutputModel extends outputBase.OutputModel {
    defaults() {
        return { ...super.defaults(), msg_id: "", outputs: [] };
    }

    initialize(attributes, options) {
        super.initialize(attributes, options);
        this.messages = [];
        this.clearPending = false;
        this.capturing = null; // [msg_id, capture function]
        this.listenTo(this, "change:msg_id", this.follow);
        this.listenTo(this, "change:outputs", this.fromState);
        this.listenTo(this, "comm:close", () => this.stopCapture());
        this.fromState();
        this.follow();
    }

    follow() {
        this.stopCapture();
        const id = this.get("msg_id");
        if (id) {
            const capture = (msg) => this.add(msg);
            this.capturing = [id, capture];
            this.widget_manager.router.capture(id, capture);
        }
    }

    stopCapture() {
        if (this.capturing) {
            this.widget_manager.router.release(...this.capturing);
            this.capturing = null;
        }
    }

    add(msg) {
        if (msg.header.msg_type === "clear_output") {
            if (msg.content && msg.content.wait) {
                this.clearPending = true;
            } else {
                this.clearPending = false;
                this.messages = [];
                this.trigger("sagecell:clear");
            }
            return;
        }
        if (this.clearPending) {
            this.clearPending = false;
            this.messages = [];
            this.trigger("sagecell:clear");
        }
        this.messages.push(msg);
        this.trigger("sagecell:message", msg);
    }

    fromState() {
        const outputs = this.get("outputs") || [];
        this.messages = outputs.map((o) => ({
            header: { msg_type: o.output_type },
            parent_header: {},
            content: o,
        }));
        this.clearPending = false;
        this.trigger("sagecell:clear");
        for (const msg of this.messages) {
            this.trigger("sagecell:message", msg);
        }
    }
}

class OutputView extends outputBase.OutputView {
    render() {
        super.render();
        this.el.classList.add("jupyter-widgets", "widget-output", "sagecell-widget-output");
        this.box = document.createElement("div");
        this.box.className = "sagecell-output";
        this.el.appendChild(this.box);
        this.area = this.model.widget_manager.helpers.outputArea(this.box);
        for (const msg of this.model.messages) {
            this.area.handleIOPub(msg);
        }
        this.listenTo(this.model, "sagecell:clear", () => this.area.clear());
        this.listenTo(this.model, "sagecell:message", (msg) => this.area.handleIOPub(msg));
        this.update();
    }
}

/**
 * Accessible names from a control's description for what ipywidgets leaves
 * unnamed: a slider's handles (noUiSlider's role="slider" elements), its
 * editable readout, a colour picker's swatch.
 */
function nameControls(el, description) {
    const name = typeof description === "string" && description ? description : "value";
    const handles = el.querySelectorAll(".noUi-handle");
    handles.forEach((handle, i) => {
        if (!handle.hasAttribute("aria-label")) {
            const which = handles.length > 1 ? (i === 0 ? " (lower)" : " (upper)") : "";
            handle.setAttribute("aria-label", name + which);
        }
    });
    for (const part of el.querySelectorAll(".widget-readout, input[type=color]")) {
        if (!part.hasAttribute("aria-label")) {
            part.setAttribute("aria-label", part.matches(".widget-readout") ? `${name}: typed value` : name);
        }
    }
}

const OUTPUT = { OutputModel, OutputView };
const CONTROLS = { ...controls, HTMLView, HTMLMathView };

export class WidgetManager extends HTMLManager {
    /**
     * @param {import("../comms.js").CommRouter} router the comms of one kernel
     * @param {{outputArea: function(HTMLElement): object, typeset: function(HTMLElement)}} helpers
     *     from the cell's code
     */
    constructor(router, helpers) {
        super();
        this.router = router;
        this.helpers = helpers;
        // What the controls typeset their math with ($x$ in a description, HTMLMath): the cell's KaTeX.
        this._rendermime = { latexTypesetter: { typeset: (el) => helpers.typeset(el) } };
    }

    async loadClass(className, moduleName) {
        const module = {
            "@jupyter-widgets/base": base,
            "@jupyter-widgets/controls": CONTROLS,
            "@jupyter-widgets/output": OUTPUT,
        }[moduleName];
        if (!module) {
            throw new Error(`The widget module ${moduleName} is not available here`);
        }
        const cls = module[className];
        if (!cls) {
            throw new Error(`Class ${className} not found in module ${moduleName}`);
        }
        return cls;
    }

    _create_comm(targetName, modelId, data, metadata, buffers) {
        const comm = this.router.newComm(targetName, modelId);
        if (data !== undefined) {
            comm.open(data, {}, metadata, buffers);
        }
        return Promise.resolve(comm);
    }

    _get_comm_info() {
        return this.router.commInfo(this.comm_target_name);
    }

    inline_sanitize(source) {
        return DOMPurify.sanitize(String(source), {
            ALLOWED_TAGS: ["a", "abbr", "b", "code", "em", "i", "img", "li", "ol", "span", "strong", "sub",
                "sup", "ul"],
            ALLOWED_ATTR: ["class", "style", "title", "href", "src", "alt"],
        });
    }

    /** Every view, once drawn, gets names for the parts a screen reader would otherwise announce bare. */
    async create_view(model, options = {}) {
        const view = await super.create_view(model, options);
        nameControls(view.el, model.get("description"));
        return view;
    }

    /** Show the model's view in el (a widget-view output). */
    async showModel(modelId, el) {
        const model = await this.get_model(modelId);
        const view = await this.create_view(model, {});
        await this.display_view(view, el);
        return view;
    }
}

export function createManager(router, helpers) {
    return new WidgetManager(router, helpers);
}
