// The dashboard in headless Chromium, driven by playwright-core.
// Run by the Rust test `dashboard_in_chromium` (crates/sagatx-cli), which
// starts the server and the executions and passes:
//   SAGATX_URL      the server, e.g. http://127.0.0.1:7700
//   SAGATX_PAUSED   the id of a paused execution, to cancel from the page
//   SAGATX_SHOTS    where to save the screenshots (docs/screenshots)
// Exits 0 when every check held; prints what failed otherwise.
import { chromium } from "playwright-core";

const base = process.env.SAGATX_URL;
const paused = process.env.SAGATX_PAUSED;
const shots = process.env.SAGATX_SHOTS;
const executable = process.env.CHROMIUM || "/usr/bin/chromium";

function check(cond, what) {
  if (!cond) {
    console.error("FAILED: " + what);
    process.exit(1);
  }
  console.log("ok: " + what);
}

const browser = await chromium.launch({
  executablePath: executable,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  page.on("dialog", d => d.accept());
  await page.goto(base + "/");
  await page.waitForSelector("#executions tbody tr");
  const statuses = await page.$$eval("#executions tbody tr .status", els => els.map(e => e.textContent));
  check(statuses.some(s => s.startsWith("completed")), "the list shows a completed execution");
  check(statuses.some(s => s.startsWith("compensated")), "the list shows a compensated execution");
  check(statuses.some(s => s.startsWith("paused")), "the list shows a paused execution");
  const completedCard = await page.$eval("#summary", el => el.textContent);
  check(/completed\s*\d/.test(completedCard), "the summary counts by status");
  const sagaRows = await page.$$eval("#by-saga tbody tr td:first-child", els => els.map(e => e.textContent));
  check(sagaRows.includes("order") && sagaRows.includes("remote"), "the summary counts by saga");
  if (shots) await page.screenshot({ path: shots + "/dashboard-list.png" });

  // Filter by status.
  await page.selectOption("#f-status", "compensated");
  await page.waitForFunction(() =>
    [...document.querySelectorAll("#executions tbody tr .status")].every(e => e.textContent.startsWith("compensated")));
  const filtered = await page.$$eval("#executions tbody tr .status", els => els.map(e => e.textContent));
  check(filtered.length >= 1 && filtered.every(s => s.startsWith("compensated")), "the status filter works");

  // An execution page: its steps and its diagram.
  await page.click("#executions tbody tr a");
  await page.waitForSelector("#timeline tbody tr");
  const steps = await page.$$eval("#timeline tbody tr", rows => rows.length);
  check(steps === 3, "the execution page shows its three steps");
  await page.waitForSelector("#diagram svg");
  const boxes = await page.$$eval("#diagram svg text", els => els.map(e => e.textContent));
  check(boxes.includes("reserve") && boxes.includes("undo reserve"), "the diagram shows steps and compensations");
  check(await page.$("#saga-error") !== null, "the error of the saga is shown");
  const calls = await page.$$eval("#calls tbody tr", rows => rows.map(r => [...r.cells].map(c => c.textContent.trim())));
  check(calls.some(c => c[1] === "charge" && c[2] === "action" && c[5].startsWith("permanent") && /402/.test(c[6])),
        "the calls show the rejected charge with its error");
  check(calls.some(c => c[1] === "reserve" && c[2] === "compensation" && c[5].startsWith("ok")),
        "the calls show the compensation of reserve");
  check(calls.every(c => /\d+ ms/.test(c[4])), "each finished call shows how long it took");
  if (shots) await page.screenshot({ path: shots + "/dashboard-execution.png", fullPage: true });

  // Cancel a paused execution from its page (the confirmation is accepted).
  await page.goto(base + "/#/executions/" + paused);
  await page.waitForSelector("button[data-act=cancel]");
  await page.click("button[data-act=cancel]");
  await page.waitForFunction(() => /compensat/.test(document.querySelector("h2")?.textContent || ""), null, { timeout: 10000 });
  check(true, "the cancel button cancels");
} finally {
  await browser.close();
}
