// OneDiff: keeps the script's status line (txt2img and img2img) and the Settings' compile cache line current.
// Both are rendered by the server at page load; this asks the status route again every second while a job runs
// in either tab (the line then says what compiles), once when it ends, and after Settings are applied.
(function() {
    var STATUS_URL = "./onediff/v1/status";
    var TABS = ["txt2img", "img2img"];
    var POLL_MS = 1000;
    var AFTER_APPLY_MS = 5000; // applying settings (clearing a large cache) may take a few seconds

    var jobWasRunning = false;
    var settingsAppliedAt = null;
    var settingsResult = null;
    var requesting = false;

    function jobRunning() {
        return TABS.some(function(tab) {
            return [tab + "_interrupt", tab + "_interrupting"].some(function(id) {
                var button = gradioApp().getElementById(id);
                return button !== null && button.style.display === "block";
            });
        });
    }

    // gradio gives an HTML component's classes and id to its outer block and to its inner "prose" div; the
    // inner one holds the server's <p> (none yet if its first rendering has not arrived)
    function setText(selector, text) {
        gradioApp().querySelectorAll(selector).forEach(function(container) {
            var paragraph = container.querySelector("p");
            if (paragraph === null) {
                paragraph = container.appendChild(document.createElement("p"));
            }
            if (paragraph.textContent !== text) paragraph.textContent = text;
        });
    }

    function refresh() {
        if (requesting) return;
        requesting = true;
        fetch(STATUS_URL, {cache: "no-store"})
            .then(function(response) {
                return response.ok ? response.json() : null;
            })
            .then(function(status) {
                if (status === null) return;
                setText(".prose.onediff-status", status.summary);
                setText(".prose#setting_onediff_compile_cache_size", status.compile_cache);
            })
            .catch(function(error) {
                console.warn("OneDiff status:", error);
            })
            .finally(function() {
                requesting = false;
            });
    }

    function tick() {
        var running = jobRunning();
        var result = gradioApp().getElementById("settings_result");
        var resultText = result === null ? null : result.textContent;
        var resultChanged = settingsResult !== null && resultText !== settingsResult;
        settingsResult = resultText;
        var afterApply = settingsAppliedAt !== null && Date.now() - settingsAppliedAt < AFTER_APPLY_MS;
        if (running || jobWasRunning || resultChanged || afterApply) refresh();
        jobWasRunning = running;
    }

    if (typeof onUiLoaded !== "function" || typeof gradioApp !== "function") return; // a UI without A1111's helpers
    onUiLoaded(function() {
        var apply = gradioApp().getElementById("settings_submit");
        if (apply !== null) {
            apply.addEventListener("click", function() {
                settingsAppliedAt = Date.now();
            });
        }
        setInterval(tick, POLL_MS);
    });
})();
