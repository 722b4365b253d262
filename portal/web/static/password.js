// Password strength meter for inputs with data-strength-meter="<meter id>".
// A simple estimate (length and character classes, penalties for repeats and
// common words); the server enforces the real rule (at least 12 characters).
(function () {
  "use strict";
  var WORDS = ["password", "passwort", "qwerty", "123456", "letmein", "admin", "welcome", "mailstead", "postmaster"];
  var LABELS = ["very weak", "weak", "fair", "good", "strong"];

  function score(pw) {
    if (!pw) { return 0; }
    var classes = 0;
    [/[a-z]/, /[A-Z]/, /[0-9]/, /[^A-Za-z0-9]/].forEach(function (re) { if (re.test(pw)) { classes += 1; } });
    var unique = {};
    for (var i = 0; i < pw.length; i += 1) { unique[pw[i]] = true; }
    var distinct = Object.keys(unique).length;
    var bits = Math.min(pw.length, distinct * 2) * Math.log2(Math.max(10, [0, 26, 36, 62, 94][classes]));
    var lower = pw.toLowerCase();
    WORDS.forEach(function (w) { if (lower.indexOf(w) !== -1) { bits -= 20; } });
    if (pw.length < 12) { return Math.min(1, bits >= 40 ? 1 : 0); }
    if (bits < 50) { return 1; }
    if (bits < 65) { return 2; }
    if (bits < 80) { return 3; }
    return 4;
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("input[data-strength-meter]").forEach(function (input) {
      var meter = document.getElementById(input.getAttribute("data-strength-meter"));
      var text = meter && document.getElementById(meter.id + "-text");
      if (!meter) { return; }
      function update() {
        var s = score(input.value);
        meter.value = s;
        if (text) {
          text.textContent = input.value ? LABELS[s] + (input.value.length < 12 ? " (at least 12 characters needed)" : "") : "";
        }
      }
      input.addEventListener("input", update);
      update();
    });
  });
})();
