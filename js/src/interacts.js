// The values of a cell's interact controls, for its permalink: read when the
// link is made, set again after the run when the link is opened.
//
// A value is stored with the control's widget class and description, in the
// order the controls are shown; opening the link sets each stored value on
// the control at the same place if it is still of that class and name, so a
// changed cell never gets a value meant for another control.

import { widgetModel } from "./widgetviews.js";

const SKIP = new Set(["HTMLModel", "HTMLMathModel", "LabelModel", "OutputModel", "ButtonModel"]);
const MAX_CONTROLS = 100;
const WAIT_MS = 30000;

/** The controls shown in el, in order: [{model, name, key, description}]. */
async function controlsIn(el) {
    const found = [];
    const visit = async (model, depth) => {
        if (!model || depth > 10 || found.length >= MAX_CONTROLS) {
            return;
        }
        const children = model.get("children");
        if (Array.isArray(children)) {
            for (const child of children) {
                await visit(child, depth + 1);
            }
            return;
        }
        const name = model.get("_model_name");
        // Selection widgets (Dropdown, SelectionSlider, ...) sync the chosen index, not the value.
        const key = model.get("value") !== undefined ? "value" : model.get("index") !== undefined ? "index" : null;
        if (model.get("_model_module") === "@jupyter-widgets/controls" && !SKIP.has(name) && key) {
            found.push({ model, name, key, description: model.get("description") || "" });
        }
    };
    for (const node of el.querySelectorAll(".sagecell-widget")) {
        if (node.parentElement.closest(".sagecell-widget")) {
            continue; // shown inside another widget: visited through its parent
        }
        await visit(await widgetModel(node.dataset.modelId), 0);
    }
    return found;
}

function plain(value) {
    return JSON.parse(JSON.stringify(value === undefined ? null : value));
}

/** [{model, description, key, value}] of the interact controls shown in el. */
export async function interactValues(el) {
    return (await controlsIn(el)).map((c) => ({
        model: c.name,
        description: c.description,
        key: c.key,
        value: plain(c.model.get(c.key)),
    }));
}

/**
 * Set stored values on the controls shown in el, once they are there (the
 * run that makes them may still be going). Resolves to how many were set.
 */
export async function setInteractValues(el, values) {
    if (!Array.isArray(values) || values.length === 0) {
        return 0;
    }
    const deadline = Date.now() + WAIT_MS;
    let controls = [];
    while (Date.now() < deadline) {
        controls = await controlsIn(el);
        if (controls.length >= values.length) {
            break;
        }
        await new Promise((resolve) => setTimeout(resolve, 100));
    }
    let set = 0;
    values.forEach((stored, i) => {
        const c = controls[i];
        if (c && stored && c.name === stored.model && c.description === stored.description &&
            c.key === (stored.key || "value")) {
            c.model.set(c.key, stored.value);
            c.model.save_changes();
            set += 1;
        }
    });
    return set;
}
