// Code that only some pages need, fetched the first time one does: ES modules
// under /static/ with content-hashed names (build.mjs writes them and puts
// their names here), so a page loads only what its cells use, and each file
// is cached for good.

/* global __SAGECELL_LAZY__ */
/** entry name ("widgets", "katex") -> its files under /static/: {js, css} */
export const LAZY = typeof __SAGECELL_LAZY__ === "object" ? __SAGECELL_LAZY__ : {};

const loading = new Map(); // entry name -> Promise of the module

/** The module of one entry (and its stylesheet, if it has one), loaded once per page. */
export function loadModule(server, name) {
    let module = loading.get(name);
    if (!module) {
        const files = LAZY[name] || {};
        if (files.css && !document.querySelector(`link[data-sagecell-lazy="${name}"]`)) {
            const link = document.createElement("link");
            link.rel = "stylesheet";
            link.href = server.url(`/static/${files.css}`);
            link.setAttribute("data-sagecell-lazy", name);
            document.head.appendChild(link);
        }
        // A classic script may import() an ES module; /static/ answers with CORS headers.
        module = files.js
            ? import(/* webpackIgnore: true */ server.url(`/static/${files.js}`))
            : Promise.reject(new Error(`${name}: this build has no such code`));
        module.catch(() => loading.delete(name)); // try again next time
        loading.set(name, module);
    }
    return module;
}
