// Sage's 3D scenes (plot3d, Sage's three.js viewer) are HTML that loads
// three.js from the notebook server's /nbextensions/threejs-sage/ path, and
// from a CDN when that fails; asked for with online=True, from the CDN alone.
// Shown in a cell, the first would go to the embedding page's own origin and
// the second to the CDN: both are pointed at the copy this server serves
// (/static/threejs-sage/, the same file passagemath installs), so the frame
// that shows a scene asks no one but this server.

const THREEJS_URL =
    /(?:https?:\/\/cdn\.jsdelivr\.net\/gh\/sagemath\/threejs-sage@|\/nbextensions\/threejs-sage\/)(r\d{2,4})\/(?:build\/)?three\.min\.js/g;

/** A URL that may stand in an attribute, in an escaped srcdoc, or in a quoted JS string. */
function inert(url) {
    return url.replace(/["'<>&\\\s]/g, (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase().padStart(2, "0"));
}

/** The HTML with every three.js of Sage's loaded from this server. */
export function localThreejs(html, server) {
    if (!server || html.indexOf("threejs-sage") < 0) {
        return html;
    }
    return html.replace(THREEJS_URL, (match, version) =>
        inert(server.url(`/static/threejs-sage/${version}/three.min.js`)));
}
