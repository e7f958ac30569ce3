// KaTeX, loaded the first time a cell shows LaTeX (see ../lazy.js).
export { default as renderMathInElement } from "katex/contrib/auto-render";
