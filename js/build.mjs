// Bundle the embed widget into sagecell_tw/static/:
//   embed.js   the widget (IIFE, defines window.sagecell), CSS included
//   embed.css  the same CSS, for pages that prefer a <link>
//   katex/     KaTeX's stylesheet and fonts, served by us (no CDN)
//
// Usage: npm ci && npm run build      (node build.mjs --watch to rebuild on change)

import { cp, mkdir, readdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const staticDir = join(here, "..", "sagecell_tw", "static");
const katexDist = join(here, "node_modules", "katex", "dist");
const watch = process.argv.includes("--watch");

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
if (watch) {
    const ctx = await esbuild.context(options);
    await ctx.watch();
} else {
    await esbuild.build(options);
}
