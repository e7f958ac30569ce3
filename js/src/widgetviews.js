// Where a widget-view output finds its widget: the registry of which kernel
// connection on the page (CommRouter, comms.js) holds which widget model.
// Apart from comms.js so that rendering output needs none of the comm code.

export const WIDGET_MIME = "application/vnd.jupyter.widget-view+json";

/** widget model id -> the CommRouter of the kernel that has it (model ids are UUIDs, unique on the page). */
export const owners = new Map();

/**
 * The element that shows a widget-view bundle, or null when no kernel on the
 * page has that model (the bundle's text/plain is shown instead).
 */
export function widgetElement(data) {
    const ref = data && data[WIDGET_MIME];
    const router = ref && typeof ref.model_id === "string" ? owners.get(ref.model_id) : undefined;
    if (!router) {
        return null;
    }
    const el = document.createElement("div");
    el.className = "sagecell-widget";
    el.dataset.modelId = ref.model_id;
    router.show(ref.model_id, el);
    return el;
}

/** The widget model with this id, from whichever kernel on the page has it (undefined if none). */
export async function widgetModel(modelId) {
    const router = owners.get(modelId);
    if (!router) {
        return undefined;
    }
    await router.chain;
    return router.manager ? router.manager.get_model(modelId) : undefined;
}
