// The status page's only script: swap in the board the server renders whenever it changes
// (server-sent events). No data is built here; the HTML arrives rendered and escaped.
"use strict";
(function () {
  var board = document.getElementById("board");
  var live = document.getElementById("live");
  if (!board || !window.EventSource) { return; }
  var known = board.getAttribute("data-revision") || "";
  var url = board.getAttribute("data-stream") + "?known=" + encodeURIComponent(known);
  var source = new EventSource(url);
  function show(text, state) { live.textContent = text; live.className = "live " + state; }
  source.onopen = function () { show("live", "on"); };
  source.addEventListener("board", function (event) {
    board.innerHTML = event.data;
    board.setAttribute("data-revision", event.lastEventId);
    show("live", "on");
  });
  source.addEventListener("end", function () {
    source.close();
    show("signed out: reload to sign in", "off");
  });
  source.onerror = function () {
    if (source.readyState === EventSource.CLOSED) { show("disconnected: reload", "off"); }
    else { show("reconnecting", "off"); }
  };
})();
