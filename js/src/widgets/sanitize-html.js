// sanitize-html's call, as ipywidgets' manager makes it, answered by DOMPurify
// (one sanitizer in the bundle instead of two; build.mjs maps the import here).

import DOMPurify from "dompurify";

export default function sanitize(html, { allowedTags, allowedAttributes } = {}) {
    const attrs = new Set();
    for (const list of Object.values(allowedAttributes || {})) {
        for (const name of list) {
            if (!name.includes("*")) {
                attrs.add(name);
            }
        }
    }
    return DOMPurify.sanitize(String(html), {
        ALLOWED_TAGS: allowedTags,
        ALLOWED_ATTR: Array.from(attrs),
    });
}
