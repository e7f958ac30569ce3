// The code editor: CodeMirror 6 with Python highlighting, or a plain textarea
// (SageMathCell's "textarea" editors). Both run the cell on Shift+Enter.
// Tab indents, so Escape is the way out: it moves the focus to what follows
// the editor on the page (the Evaluate button), and no keyboard user is trapped.

import { defaultKeymap, history, historyKeymap, indentWithTab } from "@codemirror/commands";
import { python } from "@codemirror/lang-python";
import {
    bracketMatching,
    defaultHighlightStyle,
    indentOnInput,
    indentUnit,
    syntaxHighlighting,
} from "@codemirror/language";
import { EditorState, Prec } from "@codemirror/state";
import {
    drawSelection,
    EditorView,
    highlightActiveLine,
    keymap,
    lineNumbers,
} from "@codemirror/view";

const LABEL = "Code (Shift+Enter runs it, Escape leaves the editor)";
const FOCUSABLE = "a[href], button, input, select, textarea, [tabindex], [contenteditable='true']";

/** Focus the first element after box, in document order, that the keyboard can reach. */
export function focusAfter(box) {
    for (const e of document.querySelectorAll(FOCUSABLE)) {
        if (box.contains(e) || !(box.compareDocumentPosition(e) & Node.DOCUMENT_POSITION_FOLLOWING)) {
            continue;
        }
        if (e.disabled || e.tabIndex < 0 || e.closest("[hidden], .sagecell-hidden") || !e.getClientRects().length) {
            continue;
        }
        e.focus();
        return e;
    }
    document.activeElement.blur();
    return null;
}

function codeMirrorEditor(parent, code, { readOnly, onRun }) {
    const runKey = Prec.highest(keymap.of([
        { key: "Shift-Enter", run: () => { onRun(); return true; } },
        { key: "Mod-Enter", run: () => { onRun(); return true; } },
        { key: "Escape", run: () => { focusAfter(parent); return true; } },
    ]));
    const extensions = [
        runKey,
        lineNumbers(),
        history(),
        drawSelection(),
        indentOnInput(),
        bracketMatching(),
        highlightActiveLine(),
        syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
        indentUnit.of("    "),
        python(),
        keymap.of([...defaultKeymap, ...historyKeymap, indentWithTab]),
        EditorView.lineWrapping,
        EditorState.readOnly.of(readOnly),
        EditorView.editable.of(!readOnly),
        EditorView.contentAttributes.of({ "aria-label": LABEL }),
    ];
    const view = new EditorView({
        state: EditorState.create({ doc: code, extensions }),
        parent,
    });
    return {
        kind: "codemirror",
        view,
        getCode: () => view.state.doc.toString(),
        setCode: (text) => {
            view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: text } });
        },
        focus: () => view.focus(),
        destroy: () => view.destroy(),
    };
}

function textareaEditor(parent, code, { readOnly, onRun }) {
    const ta = document.createElement("textarea");
    ta.className = "sagecell-commands";
    ta.value = code;
    ta.readOnly = readOnly;
    ta.spellcheck = false;
    ta.setAttribute("autocapitalize", "off");
    ta.setAttribute("autocorrect", "off");
    ta.setAttribute("autocomplete", "off");
    ta.setAttribute("aria-label", LABEL);
    ta.rows = Math.min(Math.max(code.split("\n").length + 1, 3), 30);
    ta.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && (event.shiftKey || event.ctrlKey || event.metaKey)) {
            event.preventDefault();
            onRun();
        } else if (event.key === "Escape") {
            event.preventDefault();
            focusAfter(parent);
        } else if (event.key === "Tab" && !event.shiftKey && !readOnly) {
            event.preventDefault();
            ta.setRangeText("    ", ta.selectionStart, ta.selectionEnd, "end");
        }
    });
    parent.appendChild(ta);
    return {
        kind: "textarea",
        textarea: ta,
        getCode: () => ta.value,
        setCode: (text) => { ta.value = text; },
        focus: () => ta.focus(),
        destroy: () => ta.remove(),
    };
}

/**
 * @param {string} type "codemirror", "codemirror-readonly", "textarea" or "textarea-readonly"
 */
export function createEditor(type, parent, code, onRun) {
    const readOnly = /-readonly$/.test(type || "");
    if (/^textarea/.test(type || "")) {
        return textareaEditor(parent, code, { readOnly, onRun });
    }
    return codeMirrorEditor(parent, code, { readOnly, onRun });
}
