// Live progress for agent jobs, without reloading the page.
// Markup: <section data-job="KIND" data-start-url=".." data-status-url=".." data-done-url="..">
//   <form data-job-start> (its CSRF token is sent) ... <ol data-job-events></ol>
//   <p data-job-state role="status" aria-live="polite"></p> </section>
// A page rendered while its job ran says so (data-watched="<job id>"), so a job that
// ends between the render and the first poll still brings its result in.
// When a job this page watched (or started) finishes, and data-done-url is set,
// the browser goes there; a job that was already finished on load does not
// redirect (no reload loops). Rows with data-service="NAME" (e.g. a deploy's
// services) get the latest detail of events whose step is NAME, and a class
// svc-ok / svc-bad / svc-busy from it. Buttons with data-copy="ID" copy that element's text;
// buttons with data-print print the page. data-idle on the section: what to say while no job runs.
(function () {
  "use strict";
  function render(box, job) {
    var list = box.querySelector("[data-job-events]");
    var state = box.querySelector("[data-job-state]");
    if (!job) { if (state) state.textContent = box.getAttribute("data-idle") || "Not started yet."; return; }
    if (list) {
      list.textContent = "";
      (job.events || []).forEach(function (e) {
        var li = document.createElement("li");
        li.textContent = e.t + " s  " + e.step + ": " + e.detail;
        li.setAttribute("data-step", e.step);
        list.appendChild(li);
      });
    }
    (job.events || []).forEach(function (e) {
      var row = box.querySelector('[data-service="' + e.step + '"]');
      if (!row) return;
      var detail = row.querySelector(".svc-state") || row;
      detail.textContent = e.detail;
      var d = String(e.detail).toLowerCase();
      row.className = d.indexOf("healthy") === 0 ? "svc-ok"
        : (d.indexOf("unhealthy") >= 0 || d.indexOf("exited") >= 0 || d.indexOf("fail") >= 0) ? "svc-bad" : "svc-busy";
    });
    box.setAttribute("data-state", job.state);
    if (state) {
      var words = {running: "Working…", done: "Done.", failed: "Failed: ", interrupted: "Interrupted: "};
      state.textContent = (words[job.state] || job.state) + (job.error ? job.error : "");
      state.className = job.state === "failed" || job.state === "interrupted" ? "error" : "";
    }
  }
  function poll(box) {
    fetch(box.getAttribute("data-status-url"), {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.json(); })
      .then(function (data) {
        var job = data.job;
        render(box, job);
        if (job && job.state === "running") {
          box.setAttribute("data-watched", job.id);
          setTimeout(function () { poll(box); }, 1000);
          return;
        }
        var watched = job && box.getAttribute("data-watched") === job.id;
        if (watched && job.state === "done" && box.getAttribute("data-done-url")) {
          var target = new URL(box.getAttribute("data-done-url"), window.location.href);
          if (target.pathname + target.search === window.location.pathname + window.location.search) {
            window.location.hash = target.hash;
            window.location.reload();  // same page: a hash change alone would not show the result
          } else {
            window.location.assign(target.href);
          }
        }
        box.dispatchEvent(new CustomEvent("job-finished", {detail: job}));
      })
      .catch(function () { setTimeout(function () { poll(box); }, 2000); });
  }
  function start(box, form) {
    var body = new FormData(form);
    fetch(box.getAttribute("data-start-url"), {method: "POST", body: body, credentials: "same-origin"})
      .then(function (r) { return r.json(); })
      .then(function (job) {
        if (job && job.id) box.setAttribute("data-watched", job.id);
        render(box, job);
        poll(box);
      });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-job]").forEach(function (box) {
      var form = box.querySelector("form[data-job-start]");
      if (form) {
        form.addEventListener("submit", function (ev) { ev.preventDefault(); start(box, form); });
      }
      poll(box);  // a reload picks up a running (or finished) job
    });
    document.querySelectorAll("[data-print]").forEach(function (button) {
      button.addEventListener("click", function () { window.print(); });
    });
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var target = document.getElementById(button.getAttribute("data-copy"));
        if (target && navigator.clipboard) {
          navigator.clipboard.writeText(target.textContent.trim());
          button.textContent = "Copied";
        }
      });
    });
  });
})();
