// MathJax configuration, loaded before javascripts/mathjax/tex-chtml.js (which the build copies
// from the django-static-mathjax package: see docs/_ext/mathjax_hook.py). arithmatex wraps every
// formula in an element of class "arithmatex" with \( \) or \[ \] delimiters; only those are
// typeset.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  },
  startup: {
    typeset: false  // typeset once below, when Material says the page is there
  }
};

document$.subscribe(() => {
  MathJax.startup.promise.then(() => {
    MathJax.typesetClear();
    MathJax.texReset();
    return MathJax.typesetPromise();
  });
});
