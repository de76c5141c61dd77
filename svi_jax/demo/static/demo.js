// svi-jax live demo: submit a job, follow its server-sent events, show each clip as it finishes.
"use strict";
const $ = (id) => document.getElementById(id);
let source = null, jobId = null, total = 0, done = 0, info = null;

function showError(msg) { $("error").textContent = msg || ""; $("error").hidden = !msg; }

function setStatus(s) {
  $("status").textContent = s.status; $("status").dataset.status = s.status;
  if (typeof s.total === "number") total = s.total;
  if (typeof s.done === "number") done = s.done;
  let text = `${done} of ${total} clip(s)`;
  if (s.status === "queued" && typeof s.position === "number")
    text += s.position === 0 ? ", next in line" : `, ${s.position} job(s) ahead`;
  if (s.status === "running" && !(info && info.ready)) text += ", loading the models";
  $("progress-text").textContent = text;
  if (s.error) showError(s.error);
  $("stop").disabled = !["queued", "running"].includes(s.status);
  $("resume").disabled = !["stopped", "failed"].includes(s.status);
  $("progress").value = total ? done / total : 0;
}

function fmt(x, unit) { return typeof x === "number" ? `${x.toFixed(x < 10 ? 2 : 1)} ${unit}` : "-"; }

function addClip(c) {
  let li = document.querySelector(`#clips li[data-clip="${c.clip}"]`);
  if (!li) {
    li = document.createElement("li"); li.dataset.clip = c.clip;
    const after = [...$("clips").children].find((x) => +x.dataset.clip > c.clip);
    $("clips").insertBefore(li, after || null);
  }
  const t = c.timings || {};
  li.innerHTML = "";
  const img = new Image(); img.src = `${c.thumb}?v=${Date.now()}`; img.alt = `clip ${c.clip + 1}`;
  const head = document.createElement("div"); head.className = "prompt";
  head.textContent = `${c.clip + 1}. ${c.prompt}`;
  const timing = document.createElement("div"); timing.className = "timing";
  timing.textContent = `seed ${c.seed} | frames ${c.frames ? c.frames.join("-") : "?"}\n`;
  timing.textContent += `sample ${fmt(t.sample_s, "s")} (${fmt(t.s_per_step, "s/step")}), ` +
    `decode ${fmt(t.decode_s, "s")}, condition ${fmt(t.condition_s, "s")}`;
  li.append(img, head, timing);
  done = Math.max(done, c.clip + 1); total = c.total || total;
  $("progress").value = total ? done / total : 0;
  $("progress-text").textContent = `${done} of ${total} clip(s)`;
  const v = $("video");
  v.src = c.video; v.load(); v.play().catch(() => {});
  $("download").href = c.video; $("download").hidden = false;
  $("video-note").textContent = `the video so far: ${done} clip(s)`;
}

function attach(id) {
  if (source) source.close();
  jobId = id; done = 0; total = 0;
  $("clips").innerHTML = ""; $("warnings").innerHTML = ""; showError("");
  $("video").removeAttribute("src"); $("download").hidden = true; $("video-note").textContent = "";
  history.replaceState(null, "", `?job=${id}`);
  source = new EventSource(`/api/jobs/${id}/events`);
  source.addEventListener("status", (e) => setStatus(JSON.parse(e.data)));
  source.addEventListener("clip", (e) => addClip(JSON.parse(e.data)));
  source.addEventListener("warning", (e) => {
    const li = document.createElement("li"); li.textContent = JSON.parse(e.data).message; $("warnings").append(li);
  });
  source.addEventListener("step", (e) => {
    const s = JSON.parse(e.data);
    $("progress").value = total ? (s.clip + s.step / s.steps) / total : 0;
    $("progress-text").textContent = `clip ${s.clip + 1} of ${total}, step ${s.step} of ${s.steps}`;
  });
}

async function post(url, body) {
  const r = await fetch(url, { method: "POST", body });
  let data = {};
  try { data = await r.json(); } catch (e) { data = { error: `${r.status} ${r.statusText}` }; }
  if (!r.ok) throw new Error(data.error || `${r.status} ${r.statusText}`);
  return data;
}

$("image").addEventListener("change", () => {
  const f = $("image").files[0];
  showError("");
  if (!f) { $("preview").hidden = true; return; }
  const lim = info && info.limits;
  if (lim && f.size > lim.max_image_bytes)
    showError(`${f.name} is ${(f.size / 1048576).toFixed(1)} MB, above the limit of ${(lim.max_image_bytes / 1048576).toFixed(1)} MB`);
  $("preview").src = URL.createObjectURL(f); $("preview").hidden = false;
});

$("form").addEventListener("submit", async (e) => {
  e.preventDefault(); showError("");
  const fd = new FormData();
  if ($("image").files[0]) fd.append("image", $("image").files[0]);
  fd.append("prompts", $("prompts").value);
  fd.append("schedule", $("schedule").value);
  fd.append("num_clips", $("num_clips").value);
  fd.append("seed", $("seed").value);
  $("generate").disabled = true;
  try { const job = await post("/api/jobs", fd); attach(job.id); }
  catch (err) { showError(err.message); }
  finally { $("generate").disabled = false; }
});

$("stop").addEventListener("click", async () => {
  try { await post(`/api/jobs/${jobId}/stop`); } catch (err) { showError(err.message); }
});
$("resume").addEventListener("click", async () => {
  showError("");
  try { await post(`/api/jobs/${jobId}/resume`); } catch (err) { showError(err.message); }
});

async function loadInfo() {
  try {
    info = await (await fetch("/api/info")).json();
    const parts = [`${info.config}`, info.lora ? `LoRA ${info.lora}` : "no LoRA",
      `${info.width}x${info.height}, ${info.num_frames} frames per clip`,
      `${info.num_steps} ${info.solver} steps, CFG ${info.cfg_scale}, shift ${info.shift}`,
      info.load_error ? info.load_error : info.ready ? "models ready" : "models loading..."];
    $("info").textContent = parts.join(" | ");
    $("image-hint").textContent = `resized to ${info.width}x${info.height}, up to ${(info.limits.max_image_bytes / 1048576).toFixed(0)} MB`;
    if (!info.ready && !info.load_error) setTimeout(loadInfo, 2000);
  } catch (e) { $("info").textContent = "the server does not answer"; setTimeout(loadInfo, 3000); }
}

loadInfo();
const wanted = new URLSearchParams(location.search).get("job");
if (wanted) attach(wanted);
