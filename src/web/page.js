// The timeline, by time: a click on archived media plays from that instant, on across
// objects and gaps (the playback API's clip of the next minutes, then the next); hovering
// shows the keyframe there; dragging selects a range to download as one MP4. A click
// elsewhere zooms in. No framework, no build step.
(function () {
  "use strict";
  var svg = document.getElementById("timeline");
  var player = document.getElementById("player");
  var playing = document.getElementById("now-playing");
  var hover = document.getElementById("hover");
  var preview = document.getElementById("preview");
  var hoverTime = document.getElementById("hover-time");
  var selection = document.getElementById("selection");
  var download = document.getElementById("download");
  if (!svg || !player) {
    return;
  }
  var from = Number(svg.dataset.from);
  var to = Number(svg.dataset.to);
  var api = "/api/v1/streams/" + encodeURIComponent(player.dataset.stream);
  // Each clip plays this long; the next follows when it ends.
  var WINDOW_MS = 20 * 60 * 1000;
  var VIEW_WIDTH = svg.viewBox.baseVal.width || 1000;

  function iso(ms) {
    return new Date(Math.floor(ms)).toISOString();
  }

  function timeAt(event) {
    var box = svg.getBoundingClientRect();
    var share = (event.clientX - box.left) / Math.max(box.width, 1);
    return from + share * (to - from);
  }

  function clipUrl(start, end, gaps) {
    return api + "/clip.mp4?start=" + iso(start) + "&end=" + iso(end) + "&gaps=" + gaps;
  }

  function zoomTo(start, end) {
    var pad = Math.max((end - start) / 10, 30000);
    var url = new URL(window.location.href);
    url.searchParams.set("from", Math.floor(start - pad));
    url.searchParams.set("to", Math.ceil(end + pad));
    window.location.href = url.toString();
  }

  // Plays from `at`: the clip starts on the frame showing then, and gaps are joined so
  // that playback never stops on a frozen frame.
  function playFrom(at) {
    at = Math.floor(at);
    player.dataset.start = String(at);
    player.src = clipUrl(at, at + WINDOW_MS, "join");
    playing.textContent = "playing from " + iso(at);
    var started = player.play();
    if (started && started.catch) {
      started.catch(function (error) {
        playing.textContent = "cannot play from " + iso(at) + " (" + error.message + ")";
      });
    }
  }

  // At a clip's end, the next: from where it ended, or past a gap longer than a clip,
  // from where the archive resumes (the spans of the next week).
  player.addEventListener("ended", function () {
    var next = Number(player.dataset.start) + WINDOW_MS;
    var url = api + "/spans?start=" + iso(next) + "&end=" + iso(next + 7 * 86400000);
    fetch(url, { credentials: "same-origin" })
      .then(function (answer) {
        return answer.ok ? answer.json() : null;
      })
      .then(function (found) {
        var span = found && found.spans && found.spans[0];
        if (span) {
          playFrom(Math.max(next, span.start_ms));
        } else {
          playing.textContent = "nothing archived after " + iso(next);
        }
      });
  });
  player.addEventListener("error", function () {
    if (player.dataset.start) {
      playing.textContent = "nothing more archived after " + iso(Number(player.dataset.start));
    }
  });

  // Hover: the keyframe at the pointer, fetched once the pointer rests.
  var hoverTimer = null;
  function showPreview(event) {
    var at = timeAt(event);
    var box = svg.getBoundingClientRect();
    hover.hidden = false;
    hover.style.left = Math.max(0, event.clientX - box.left - 80) + "px";
    hoverTime.textContent = iso(at);
    clearTimeout(hoverTimer);
    hoverTimer = setTimeout(function () {
      preview.dataset.at = String(Math.floor(at));
      preview.src = api + "/preview.mp4?at=" + iso(at);
    }, 150);
  }

  // Selection: a drag across the timeline, drawn over it, downloadable as one MP4.
  var down = null;
  var dragged = false;
  var NS = "http://www.w3.org/2000/svg";
  var band = document.createElementNS(NS, "rect");
  band.setAttribute("id", "selected");
  band.setAttribute("y", "0");
  band.setAttribute("height", "110");
  band.setAttribute("fill", "rgba(26, 95, 180, 0.25)");
  band.style.pointerEvents = "none";
  band.style.display = "none";
  svg.appendChild(band);

  function drawBand(a, b) {
    var start = Math.min(a, b);
    var end = Math.max(a, b);
    band.setAttribute("x", String(((start - from) / (to - from)) * VIEW_WIDTH));
    band.setAttribute("width", String(((end - start) / (to - from)) * VIEW_WIDTH));
    band.style.display = "";
  }

  function select(a, b) {
    var start = Math.floor(Math.min(a, b));
    var end = Math.ceil(Math.max(a, b));
    drawBand(start, end);
    download.href = clipUrl(start, end, "hold");
    download.setAttribute("download", player.dataset.stream + "_" + iso(start).replace(/[:.]/g, "") + ".mp4");
    download.dataset.start = String(start);
    download.dataset.end = String(end);
    download.textContent = "download " + iso(start) + " .. " + iso(end) + " (" + ((end - start) / 1000).toFixed(1) + " s)";
    selection.hidden = false;
  }

  svg.addEventListener("mousedown", function (event) {
    down = { x: event.clientX, at: timeAt(event) };
    dragged = false;
  });
  svg.addEventListener("mousemove", function (event) {
    if (down && Math.abs(event.clientX - down.x) > 6) {
      dragged = true;
      drawBand(down.at, timeAt(event));
    }
    showPreview(event);
  });
  svg.addEventListener("mouseleave", function () {
    hover.hidden = true;
    clearTimeout(hoverTimer);
  });
  svg.addEventListener("mouseup", function (event) {
    if (down && dragged) {
      select(down.at, timeAt(event));
    }
    down = null;
  });

  svg.addEventListener("click", function (event) {
    if (dragged) {
      dragged = false;
      return;
    }
    var target = event.target.closest("rect");
    var at = timeAt(event);
    if (target && target.dataset.key && !/\.mkv$/.test(target.dataset.key)) {
      playFrom(at);
    } else if (target && target.dataset.start && Number(target.dataset.count) > 1) {
      zoomTo(Number(target.dataset.start), Number(target.dataset.end));
    } else {
      var quarter = (to - from) / 8;
      zoomTo(at - quarter, at + quarter);
    }
  });
})();
