// The gallery's only script (served from /static, as the CSP requires): the checkpoint
// slider and arrow keys, and live updates by polling the page's /live endpoint.
"use strict";

const POLL_MS = 2000;
const FINISHED = new Set(["Succeeded", "Failed"]);

function stepper(root) {
  const box = root.querySelector(".stepper");
  if (!box) return;
  const slider = box.querySelector("#slider");
  const shown = box.querySelector("#shown");
  const figures = Array.from(root.querySelectorAll("figure.grid"));
  const show = (index) => {
    const i = Math.max(0, Math.min(figures.length - 1, index));
    slider.value = String(i);
    figures.forEach((f, j) => f.classList.toggle("hidden", j !== i));
    shown.textContent = "step " + figures[i].dataset.step;
  };
  slider.addEventListener("input", () => show(Number(slider.value)));
  box.querySelector(".prev").addEventListener("click", () => show(Number(slider.value) - 1));
  box.querySelector(".next").addEventListener("click", () => show(Number(slider.value) + 1));
  root.showStep = (step) => {
    const i = figures.findIndex((f) => f.dataset.step === String(step));
    show(i < 0 ? figures.length - 1 : i);
  };
  root.currentStep = () => figures[Number(slider.value)].dataset.step;
  root.atLast = () => Number(slider.value) === figures.length - 1;
  show(Number(slider.value));
}

function keys() {
  document.addEventListener("keydown", (event) => {
    const slider = document.getElementById("slider");
    if (!slider || event.target === slider || event.target.tagName === "SELECT") return;
    const move = { ArrowLeft: -1, ArrowRight: 1 }[event.key];
    if (move === undefined) return;
    event.preventDefault();
    slider.value = String(Number(slider.value) + move);
    slider.dispatchEvent(new Event("input"));
  });
}

async function poll(url, apply) {
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
      if (response.ok && apply(await response.json()) === false) return;
    } catch (err) {
      // the server restarts or the network drops: try again at the next tick
    }
  }
}

function liveJobs(url) {
  poll(url + window.location.search, (data) => {
    document.getElementById("rows").innerHTML = data.rows;
    document.getElementById("count").textContent = data.count;
  });
}

function liveJob(url) {
  const checkpoints = document.getElementById("checkpoints");
  let steps = (checkpoints.querySelector(".stepper") || { dataset: { steps: "" } }).dataset.steps;
  const initial = document.getElementById("phase");
  if (initial && FINISHED.has(initial.textContent)) return;
  poll(url, (data) => {
    document.getElementById("status").innerHTML = data.status;
    document.getElementById("curve").innerHTML = data.curve;
    if (data.steps !== steps) {
      const follow = !checkpoints.atLast || checkpoints.atLast();
      const current = checkpoints.currentStep ? checkpoints.currentStep() : null;
      checkpoints.innerHTML = data.checkpoints;
      steps = data.steps;
      stepper(checkpoints);
      if (checkpoints.showStep) checkpoints.showStep(follow ? null : current);
    }
    return !FINISHED.has(data.phase);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  const live = document.body.dataset.live;
  if (page === "job") {
    stepper(document.getElementById("checkpoints"));
    keys();
    if (live) liveJob(live);
  } else if (page === "jobs" && live) {
    liveJobs(live);
  }
});
