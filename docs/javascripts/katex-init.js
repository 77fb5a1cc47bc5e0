// Renders the pages' LaTeX with the KaTeX served with the site (docs/assets/katex): no network.
// pymdownx.arithmatex (generic mode) leaves inline math as <span class="arithmatex">\(...\)</span>
// and display math as <div class="arithmatex">\[...\]</div>. A formula KaTeX cannot parse is
// reported on the console and left as it is, so the site's browser test sees it.
function renderMath(root) {
  for (const el of root.querySelectorAll(".arithmatex")) {
    const text = el.textContent.trim();
    const display = el.tagName === "DIV";
    const tex = text.slice(2, -2);  // drop \( \) or \[ \]
    try {
      katex.render(tex, el, { displayMode: display, throwOnError: true, strict: "error" });
    } catch (e) {
      console.error("KaTeX could not render " + JSON.stringify(tex) + ": " + e.message);
    }
  }
  document.documentElement.dataset.math = "rendered";  // for the site's browser test: rendering is over
}
if (typeof document$ !== "undefined") {
  document$.subscribe(({ body }) => renderMath(body));  // Material: every page, instant navigation too
} else {
  document.addEventListener("DOMContentLoaded", () => renderMath(document.body));
}
