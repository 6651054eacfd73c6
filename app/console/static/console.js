// rilla-bridge console: live refresh only. Every page works without this script; with it, a
// page that asks for it (data-refresh="seconds" on <body>) reloads itself, unless the
// operator is typing in a form or has ticked something.
(function () {
  "use strict";
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (!seconds) { return; }
  var busy = false;
  document.addEventListener("input", function () { busy = true; });
  document.addEventListener("change", function () { busy = true; });
  window.setInterval(function () {
    if (!busy && document.visibilityState === "visible") { window.location.reload(); }
  }, seconds * 1000);
})();
