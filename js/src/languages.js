// The language of a cell, as SageMathCell has it: the `languages` option
// (a selector when it offers more than one), `defaultLanguage`, and the code
// of each language wrapped on the page into Sage code for a Sage kernel, as
// SageMathCell's session.js does, so pages written for it run the same here.
//
// A server with a `sagemath` kernel runs every language in it (so linked
// cells share one namespace whatever their language). A Python-only server
// runs Python (and HTML, through IPython's display) in its `python3` kernel;
// the languages that need Sage (sage, gap, gp, maxima, singular) are not
// offered there.

export const SAGE_KERNEL = "sagemath";
export const PYTHON_KERNEL = "python3";

/** The languages a cell may offer, in SageMathCell's order, with its labels. */
export const LABELS = {
    sage: "Sage",
    gap: "Gap",
    gp: "GP",
    html: "HTML",
    maxima: "Maxima",
    python: "Python",
    singular: "Singular",
};
export const ALL_LANGUAGES = Object.keys(LABELS);

/** Whether a kernel of this name runs code in this language. */
export function runs(kernelName, language) {
    if (kernelName === SAGE_KERNEL) {
        return language in LABELS;
    }
    return language === "python" || language === "html";
}

/** The code as a Python string literal, escaped as SageMathCell escapes it. */
function literal(code) {
    return '("""' + code.replace(/\\/g, "\\\\").replace(/"/g, '\\"') + '""")';
}

/**
 * What the kernel is sent for code in `language`. In a Sage kernel: Sage
 * code as it is, Python through exec (not preparsed), HTML through Sage's
 * html(), and gp, gap, maxima, singular through Sage's interface to each
 * (`print(gp.eval("""..."""))`), exactly as SageMathCell sends them.
 */
export function wrapCode(language, code, kernelName) {
    if (!runs(kernelName, language)) {
        throw new Error(`A ${kernelName} kernel does not run ${LABELS[language] || language} code`);
    }
    if (kernelName === SAGE_KERNEL) {
        if (language === "sage") {
            return code;
        }
        if (language === "python") {
            return "exec" + literal(code);
        }
        if (language === "html") {
            return "html" + literal(code);
        }
        return "print(" + language + ".eval" + literal(code) + ")";
    }
    if (language === "html") {
        return '__import__("IPython.display").display.HTML' + literal(code);
    }
    return code;
}

/** The kernel cells on a server with these kernels run in: Sage's where there is one. */
export function kernelFor(kernelNames) {
    if (kernelNames.includes(SAGE_KERNEL)) {
        return SAGE_KERNEL;
    }
    return kernelNames.includes(PYTHON_KERNEL) ? PYTHON_KERNEL : kernelNames[0];
}

/** The known languages of a `languages` option, in its order; the others are reported. */
export function knownLanguages(list) {
    const known = [];
    for (const name of typeof list === "string" ? [list] : Array.from(list || [])) {
        const language = String(name).toLowerCase();
        if (!(language in LABELS)) {
            console.warn(`sagecell: this server has no language ${JSON.stringify(name)}`);
        } else if (!known.includes(language)) {
            known.push(language);
        }
    }
    return known;
}

const kernelLists = new Map(); // server base -> Promise of its kernel names, default first

/** The kernels a server runs (GET /api/kernelspecs), asked once per server. */
export function serverKernels(server) {
    let names = kernelLists.get(server.base);
    if (!names) {
        names = server.kernelNames();
        kernelLists.set(server.base, names);
        names.catch(() => kernelLists.delete(server.base)); // asked again next time
    }
    return names;
}

/**
 * The language selector of one cell and the kernel its group runs.
 *
 * Options (makeSagecell's): `languages` (offered; default: Sage's or,
 * on a Python-only server, Python), `defaultLanguage` (the one selected
 * first; a cell's `data-lang` attribute sets it per cell, and offers it
 * alone when the page gives no `languages`), and ours, `kernelName`: the
 * kernel to run instead of the server's choice.
 */
export class LanguageChoice {
    constructor(options, server, group) {
        this.server = server;
        this.group = group;
        this.requested = options.languages === undefined ? null : knownLanguages(options.languages);
        this.preferred = options.defaultLanguage ? String(options.defaultLanguage).toLowerCase() : null;
        if (this.requested === null && this.preferred in LABELS) {
            this.requested = [this.preferred];
        }
        this.kernelName = options.kernelName || null;
        this.unavailable = null; // why nothing offered can run here, once known
        this.settled = null; // promise, once the server's kernels are known

        this.element = document.createElement("span");
        this.element.className = "sagecell-language";
        const label = document.createElement("label");
        label.textContent = "Language: ";
        this.select = document.createElement("select");
        this.select.className = "sagecell-language-select";
        label.appendChild(this.select);
        this.element.appendChild(label);
        this.offer(this.requested || []);
        this.ready();
    }

    /** The language selected now. */
    get language() {
        return this.select.value || (this.requested && this.requested[0]) || "sage";
    }

    /** Select a language this cell offers; false when it offers no such language. */
    setLanguage(language) {
        const name = String(language || "").toLowerCase();
        if (!Array.from(this.select.options).some((o) => o.value === name)) {
            return false;
        }
        this.preferred = name;
        this.select.value = name;
        return true;
    }

    /**
     * Fill the selector; shown only when there is a choice. The language
     * selected stays if offered, else the preferred one, else `fallback`.
     */
    offer(languages, fallback = null) {
        const current = this.select.value;
        this.select.textContent = "";
        for (const language of languages) {
            const option = document.createElement("option");
            option.value = language;
            option.textContent = LABELS[language];
            this.select.appendChild(option);
        }
        const first = [current, this.preferred, fallback].find((l) => l && languages.includes(l));
        this.select.value = first || languages[0] || "";
        this.element.hidden = languages.length < 2;
    }

    /**
     * Resolves once the server's kernels are known: the group's kernel is
     * chosen and the selector offers what it runs. Asked again after a failure.
     */
    ready() {
        if (!this.settled) {
            // A page that names its kernel need not ask the server which it runs.
            const known = this.kernelName ? Promise.resolve([this.kernelName]) : serverKernels(this.server);
            this.settled = known.then(
                (names) => this.settle(names),
                (e) => {
                    this.settled = null;
                    if (!e.status) {
                        this.group.emit("unreachable"); // no answer at all, as a kernel start would say
                    }
                    throw e;
                },
            );
            this.settled.catch(() => {}); // evaluate() reports it
        }
        return this.settled;
    }

    settle(kernelNames) {
        const kernel = this.kernelName || kernelFor(kernelNames);
        const wanted = this.requested || [kernel === SAGE_KERNEL ? "sage" : "python"];
        const offered = wanted.filter((language) => runs(kernel, language));
        // Where Sage cannot run, Python stands in for it as the first choice.
        this.offer(offered, "python");
        this.unavailable = offered.length ? null : this.whyNot(kernel, kernelNames, wanted);
        if (!this.group.name || (!this.group.kernel && !this.group.starting)) {
            this.group.name = kernel;
        }
    }

    whyNot(kernel, kernelNames, wanted) {
        const names = wanted.map((l) => LABELS[l]).join(", ") || "no language";
        if (this.kernelName || kernelNames.includes(SAGE_KERNEL)) {
            return `A ${kernel} kernel cannot run ${names} code.`;
        }
        return `This server has no Sage kernel, so it cannot run ${names} code.`;
    }

    /** The code to send for the editor's code in the selected language (throws if it cannot run). */
    async wrap(code) {
        await this.ready();
        if (this.unavailable) {
            throw new Error(this.unavailable);
        }
        return wrapCode(this.language, code, this.group.name);
    }
}
