// Bundle the embed widget into sagecell_tw/static/:
//   embed.js   the widget (IIFE, defines window.sagecell), CSS included
//   embed.css  the same CSS, for pages that prefer a <link>
//   katex/     KaTeX's stylesheet and fonts, served by us (no CDN)
//   widgets-HASH.js, widgets-HASH.css  ipywidgets' manager and controls (an ES
//              module and its CSS), loaded by embed.js on a kernel's first
//              comm_open; katex-HASH.js, loaded on the first LaTeX output;
//              named by content, so they are cached for good
//   *.gz, *.br  every text file compressed once here, at the best levels, for
//              the server to send to clients that accept them
//
// Usage: npm ci && npm run build      (node build.mjs --watch to rebuild on change)

import { cp, mkdir, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import * as zlib from "node:zlib";

import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const staticDir = join(here, "..", "sagecell_tw", "static");
const katexDist = join(here, "node_modules", "katex", "dist");
const watch = process.argv.includes("--watch");

const widgetsSrc = join(here, "src", "widgets");

// Modules the HTML manager imports that a cell never uses (see src/widgets/stubs.js).
const stubbed = {
    "@jupyterlab/rendermime": join(widgetsSrc, "stubs.js"),
    "@jupyterlab/outputarea": join(widgetsSrc, "stubs.js"),
    "@jupyter-widgets/base7": join(widgetsSrc, "stubs.js"),
    "@jupyter-widgets/controls7": join(widgetsSrc, "stubs.js"),
    "sanitize-html": join(widgetsSrc, "sanitize-html.js"),
    semver: join(widgetsSrc, "stubs.js"),
};

const stubPlugin = {
    name: "sagecell-stubs",
    setup(build) {
        const names = Object.keys(stubbed).map((k) => k.replace(/[/.]/g, "\\$&"));
        build.onResolve({ filter: new RegExp(`^(${names.join("|")})(/|$)`) },
            (args) => {
                const name = Object.keys(stubbed).find((k) => args.path === k || args.path.startsWith(k + "/"));
                if (args.path.endsWith(".css")) {
                    return { path: join(widgetsSrc, "empty.css") };
                }
                return { path: stubbed[name] };
            });
    },
};

const lazyOptions = {
    entryPoints: {
        widgets: join(widgetsSrc, "manager.js"),
        katex: join(here, "src", "lazy", "katex.js"),
    },
    outdir: staticDir,
    entryNames: "[name]-[hash]",
    assetNames: "[name]-[hash]",
    bundle: true,
    format: "esm",
    target: ["es2020"],
    minify: !watch,
    sourcemap: false,
    legalComments: "eof",
    metafile: true,
    plugins: [stubPlugin],
    loader: { ".svg": "dataurl", ".woff": "file", ".woff2": "file", ".ttf": "file", ".eot": "file" },
    define: { "process.env.NODE_ENV": JSON.stringify("production") },
    logLevel: "info",
};

/**
 * Build the code that pages load only when a cell needs it (src/lazy.js):
 * returns {entry name: {js, css}}, the names of its files under static/.
 */
async function buildLazy() {
    const names = Object.keys(lazyOptions.entryPoints);
    for (const name of await readdir(staticDir)) {
        if (names.some((n) => name.startsWith(`${n}-`))) {
            await rm(join(staticDir, name));
        }
    }
    const result = await esbuild.build(lazyOptions);
    const files = {};
    for (const [path, info] of Object.entries(result.metafile.outputs)) {
        if (info.entryPoint && path.endsWith(".js")) {
            const name = basename(path).replace(/-[^-]+\.js$/, "");
            files[name] = { js: basename(path), css: info.cssBundle ? basename(info.cssBundle) : "" };
        }
    }
    return files;
}

const COMPRESSIBLE = /\.(js|css|html|svg|json|ttf|map)$/;

/** file.gz and file.br beside each text file of static/, for clients that accept them. */
async function precompress(dir) {
    const gzip = promisify(zlib.gzip);
    const brotli = promisify(zlib.brotliCompress);
    const entries = await readdir(dir, { withFileTypes: true });
    const names = new Set(entries.map((entry) => entry.name));
    for (const entry of entries) {
        const path = join(dir, entry.name);
        if (entry.isDirectory()) {
            await precompress(path);
        } else if (/\.(gz|br)$/.test(entry.name)) {
            // The copy of a file that is gone (a stale hashed name); the others are rewritten.
            if (!names.has(entry.name.replace(/\.(gz|br)$/, ""))) {
                await rm(path);
            }
        } else if (COMPRESSIBLE.test(entry.name)) {
            const data = await readFile(path);
            await writeFile(`${path}.gz`, await gzip(data, { level: 9 }));
            await writeFile(`${path}.br`, await brotli(data, {
                params: {
                    [zlib.constants.BROTLI_PARAM_QUALITY]: 11,
                    [zlib.constants.BROTLI_PARAM_SIZE_HINT]: data.length,
                },
            }));
        }
    }
}

const options = {
    entryPoints: [join(here, "src", "index.js")],
    outfile: join(staticDir, "embed.js"),
    bundle: true,
    format: "iife",
    target: ["es2020"],
    minify: !watch,
    sourcemap: false,
    legalComments: "eof",
    loader: { ".css": "text" },
    logLevel: "info",
};

async function copyAssets() {
    await mkdir(staticDir, { recursive: true });
    await cp(join(here, "src", "embed.css"), join(staticDir, "embed.css"));
    const katexOut = join(staticDir, "katex");
    await rm(katexOut, { recursive: true, force: true });
    await mkdir(join(katexOut, "fonts"), { recursive: true });
    await cp(join(katexDist, "katex.min.css"), join(katexOut, "katex.min.css"));
    for (const name of await readdir(join(katexDist, "fonts"))) {
        if (/\.(woff2|woff|ttf)$/.test(name)) {
            await cp(join(katexDist, "fonts", name), join(katexOut, "fonts", name));
        }
    }
}

await copyAssets();
options.define = { __SAGECELL_LAZY__: JSON.stringify(await buildLazy()) };
if (watch) {
    const ctx = await esbuild.context(options);
    await ctx.watch();
} else {
    await esbuild.build(options);
    await precompress(staticDir);
}
