// Stands in for Ortto's tracking script: it installs its own ap3c functions, as the real
// one does when it loads, and runs the commands queued in ap3c.cmd.
(function () {
  window.orttoCalls = [];
  ap3c.init = function (key) { window.orttoCalls.push(["init", key]); };
  ap3c.track = function (t) { window.orttoCalls.push(["track", t.email || t.ei || null]); };
  ap3c.activity = function (a) { window.orttoCalls.push(["activity", a.activity_id]); };
  var queued = ap3c.cmd || [];
  ap3c.cmd = { push: function (fn) { fn(); } };
  for (var i = 0; i < queued.length; i++) queued[i]();
})();
