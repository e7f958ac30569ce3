// SageMathCell's "?z=" format: base64url(zlib(code)), and the query
// parameters of the demo page (?q= permalink id, ?z= compressed, ?c= plain).

async function pump(stream, bytes) {
    const writer = stream.writable.getWriter();
    // Errors surface when reading; don't let the writer's copies go unhandled.
    writer.write(bytes).catch(() => {});
    writer.close().catch(() => {});
    return new Uint8Array(await new Response(stream.readable).arrayBuffer());
}

function base64urlToBytes(text) {
    // A "+" may arrive as a space after form decoding; accept both alphabets.
    let b64 = text.trim().replace(/ /g, "+").replace(/-/g, "+").replace(/_/g, "/");
    b64 = b64.replace(/=+$/, "");
    b64 += "=".repeat((4 - (b64.length % 4)) % 4);
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) {
        bytes[i] = bin.charCodeAt(i);
    }
    return bytes;
}

function bytesToBase64url(bytes) {
    let bin = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
        bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_");
}

/** Code from a ?z= value. */
export async function decodeZ(z) {
    const bytes = base64urlToBytes(z);
    const out = await pump(new DecompressionStream("deflate"), bytes);
    return new TextDecoder("utf-8").decode(out);
}

/** A ?z= value for code (zlib, as Python's zlib.compress makes). */
export async function encodeZ(code) {
    const bytes = new TextEncoder().encode(code);
    return bytesToBase64url(await pump(new CompressionStream("deflate"), bytes));
}

/** A permalink's interact values: a JSON array (as stored) or an array; anything else is none. */
function storedInteracts(value) {
    try {
        const list = typeof value === "string" ? JSON.parse(value) : value;
        return Array.isArray(list) ? list : [];
    } catch (e) {
        return [];
    }
}

/**
 * The code a page URL asks for, and its language: ?c= (plain), ?z= (compressed)
 * with ?lang=, or ?q= (stored permalink, fetched from the server, which keeps
 * the language). Resolves to null when there is none.
 */
export async function codeFromQuery(search, server) {
    const params = new URLSearchParams(search);
    const language = params.get("lang") || undefined; // SageMathCell's ?z=...&lang=
    if (params.has("c")) {
        return { code: params.get("c"), language, source: "c" };
    }
    if (params.has("z")) {
        return { code: await decodeZ(params.get("z")), language, source: "z" };
    }
    if (params.has("q")) {
        // SageMathCell answers [code, language, interacts]; accept {code, ...} too.
        const body = await server.getPermalink(params.get("q"));
        const code = Array.isArray(body) ? body[0] : body && body.code;
        const language = Array.isArray(body) ? body[1] : body && body.language;
        if (typeof code !== "string") {
            throw new Error("The permalink answer has no code");
        }
        return { code, language, interacts: storedInteracts(Array.isArray(body) ? body[2] : body.interacts),
            source: "q" };
    }
    return null;
}
