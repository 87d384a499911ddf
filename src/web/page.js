// The timeline's clicks: an object plays in the page; a run of objects, or the
// background, zooms in around the click. No framework, no build step.
(function () {
  "use strict";
  var svg = document.getElementById("timeline");
  var player = document.getElementById("player");
  var playing = document.getElementById("now-playing");
  if (!svg) {
    return;
  }
  var from = Number(svg.dataset.from);
  var to = Number(svg.dataset.to);

  function timeAt(event) {
    var box = svg.getBoundingClientRect();
    var share = (event.clientX - box.left) / Math.max(box.width, 1);
    return from + share * (to - from);
  }

  function zoomTo(start, end) {
    var pad = Math.max((end - start) / 10, 30000);
    var url = new URL(window.location.href);
    url.searchParams.set("from", Math.floor(start - pad));
    url.searchParams.set("to", Math.ceil(end + pad));
    window.location.href = url.toString();
  }

  function play(rect, at) {
    var key = rect.dataset.key;
    var offset = Number(rect.dataset.offset) + Math.max(at - Number(rect.dataset.start), 0);
    player.src = "/media/" + key.split("/").map(encodeURIComponent).join("/");
    player.dataset.key = key;
    playing.textContent = key + " from " + (offset / 1000).toFixed(1) + " s";
    player.addEventListener("loadedmetadata", function seek() {
      player.removeEventListener("loadedmetadata", seek);
      if (offset / 1000 < player.duration) {
        player.currentTime = offset / 1000;
      }
    });
    var started = player.play();
    if (started && started.catch) {
      started.catch(function (error) {
        playing.textContent = key + ": cannot play (" + error.message + ")";
      });
    }
  }

  svg.addEventListener("click", function (event) {
    var target = event.target.closest("rect");
    var at = timeAt(event);
    if (target && target.dataset.key) {
      play(target, at);
    } else if (target && target.dataset.start && Number(target.dataset.count) > 1) {
      zoomTo(Number(target.dataset.start), Number(target.dataset.end));
    } else {
      var quarter = (to - from) / 8;
      zoomTo(at - quarter, at + quarter);
    }
  });
})();
