// Stand-ins, at bundle time (build.mjs), for modules that the HTML manager
// imports but an embedded cell never uses: JupyterLab's output area and
// MIME renderers (our Output widget shows output with the cell's own code)
// the ipywidgets 7 copies, and semver, with which the manager's own
// loadClass (replaced in manager.js) picks between 7 and 8. Keeping them out saves most of the bundle.

export class RenderMimeRegistry {
    addFactory() {}
}
export const standardRendererFactories = [];
export class OutputAreaModel {}
export class OutputArea {}
export const v7 = null;
export function maxSatisfying() {
    return null;
}
