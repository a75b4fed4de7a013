// pgqueue dashboard: confirmations, API calls for the buttons, and auto-refresh.
// No framework and no build step: pages are rendered by the server; this only wires them up.
"use strict";
(function () {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const base = meta("pgqueue-base");
  const csrf = meta("pgqueue-csrf");
  const refreshMs = Math.max(1, Number(meta("pgqueue-refresh")) || 5) * 1000;
  let busy = false;

  function flash(text, isError) {
    const box = document.getElementById("flash");
    box.textContent = text;
    box.className = isError ? "show error" : "show";
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => { box.className = ""; }, 6000);
  }

  function formBody(form) {
    const body = {};
    for (const el of form.elements) {
      if (!el.name || el.disabled) continue;
      if (el.type === "checkbox") {
        if (!body[el.name]) body[el.name] = [];
        if (el.checked) body[el.name].push(el.value);
        continue;
      }
      const raw = el.value.trim();
      if (el.type === "number") {
        if (raw === "") {
          if (el.dataset.empty === "null") body[el.name] = null;
          continue;
        }
        body[el.name] = Number(raw) * Number(el.dataset.scale || 1);
      } else if (raw !== "") {
        body[el.name] = raw;
      }
    }
    return body;
  }

  async function call(el, body) {
    if (el.dataset.confirm && !window.confirm(el.dataset.confirm)) return;
    busy = true;
    try {
      const response = await fetch(base + el.dataset.action, {
        method: el.dataset.method || "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      let data = {};
      try { data = await response.json(); } catch (e) { /* empty body */ }
      if (!response.ok) {
        const detail = Array.isArray(data.detail)
          ? data.detail.map((d) => d.msg).join("; ") : data.detail;
        flash(`Failed: ${detail || response.status}`, true);
        return;
      }
      flash(data.message || (data.action ? `${data.action.replace(/_/g, " ")}: job ${data.job_id}` : "Done"));
      if (el.dataset.after === "goto-job" && data.job_id) {
        window.location.assign(`${base}/jobs/${data.job_id}`);
      } else if (el.dataset.after === "jobs") {
        window.location.assign(`${base}/jobs`);
      } else {
        await refresh(true);
      }
    } catch (err) {
      flash(`Failed: ${err}`, true);
    } finally {
      busy = false;
    }
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) {
      event.preventDefault();
      call(button);
    }
  });

  document.addEventListener("submit", (event) => {
    const form = event.target.closest("form[data-action]");
    if (form) {
      event.preventDefault();
      call(form, formBody(form));
    }
  });

  async function refresh(force) {
    const toggle = document.getElementById("auto-refresh");
    if (!force && (busy || document.hidden || !toggle || !toggle.checked)) return;
    // Do not wipe what the operator is typing or has unfolded.
    const active = document.activeElement;
    if (!force && (document.querySelector("main details[open]:not(.keep)")
        || (active && active.closest("main form")))) return;
    const response = await fetch(window.location.href, { credentials: "same-origin" });
    if (response.redirected || !response.ok) {
      if (response.redirected) window.location.reload();
      return;
    }
    const doc = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = doc.getElementById("content");
    if (fresh) document.getElementById("content").replaceChildren(...fresh.childNodes);
  }

  const toggle = document.getElementById("auto-refresh");
  if (toggle) {
    toggle.checked = localStorage.getItem("pgqueue-auto-refresh") !== "off";
    toggle.addEventListener("change", () => {
      localStorage.setItem("pgqueue-auto-refresh", toggle.checked ? "on" : "off");
    });
  }
  setInterval(() => { refresh(false).catch(() => {}); }, refreshMs);

  const logout = document.getElementById("logout");
  if (logout) {
    logout.addEventListener("click", async () => {
      await fetch(`${base}/logout`, {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
      });
      window.location.assign(`${base}/login`);
    });
  }
})();
