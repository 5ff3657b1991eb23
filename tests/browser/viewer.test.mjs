// viewer.test.mjs: drives the live viewer page (`/`, src/daemon/viewer.html) in Debian's
// Chromium through playwright-core (which never downloads a browser here: executablePath is
// /usr/bin/chromium).
//
// It is run by tests/integration/test_viewer_browser.py, which starts the emulator and the
// daemon, mints the tokens and does the MongoDB writes. The two talk over stdio: this script
// prints `STEP <name>` and waits for the harness to answer `OK` (or `ERR <text>`) on stdin once
// it has done that step's writes. Everything else printed is log.
//
// Environment: MC_VIEWER_URL (the daemon's base URL), MC_VIEWER_STREAM, MC_TOKEN_ALICE,
// MC_TOKEN_BAD (a token the daemon refuses: signed with the wrong key), MC_ARTIFACTS (where
// viewer.png goes), MC_VIEWER_TLS (see below). Exits 0 when every check passed, 1 (with the reason) otherwise; a Chromium
// that cannot start is a failure, never a skip.

import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is required`);
  return v;
};
const BASE = env("MC_VIEWER_URL");
const STREAM = env("MC_VIEWER_STREAM");
const TOKEN_ALICE = env("MC_TOKEN_ALICE");
const TOKEN_BAD = env("MC_TOKEN_BAD");
const ARTIFACTS = process.env.MC_ARTIFACTS || "tests/artifacts";
// MC_VIEWER_TLS=1: BASE is https:// with the harness's test certificate, which Chromium is
// told to accept (the page then subscribes over wss://); only checks 1 to 3 run and the
// screenshot is viewer-tls.png.
const TLS = process.env.MC_VIEWER_TLS === "1";
const SHOT = TLS ? "viewer-tls.png" : "viewer.png";
const WAIT = 20000;

// ---- stdio protocol with the harness ----
const answers = [];
const waiters = [];
createInterface({ input: process.stdin }).on("line", (line) => {
  const w = waiters.shift();
  if (w) w(line); else answers.push(line);
});
function nextAnswer() {
  return answers.length ? Promise.resolve(answers.shift()) : new Promise((r) => waiters.push(r));
}
async function step(name) {
  process.stdout.write(`STEP ${name}\n`);
  const a = await nextAnswer();
  if (a !== "OK") throw new Error(`harness step ${name} failed: ${a}`);
}
const log = (msg) => process.stdout.write(`viewer-test: ${msg}\n`);

function check(cond, msg) {
  if (!cond) throw new Error(`check failed: ${msg}`);
}

// ---- the test ----
async function run(page) {
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") log(`console error: ${m.text()}`); });

  const insertRows = () => page.locator('#feed details.row[data-op="insert"]');
  const status = page.locator("#status");

  await page.goto(BASE, { waitUntil: "load" });
  check((await page.title()) === "mongocast live viewer", "page title");
  // The stream list comes from GET /v1/streams.
  await page.waitForSelector(`#stream option[value="${STREAM}"]`, { state: "attached", timeout: WAIT });

  // 1. A refused subscription shows the server's reason and does not retry.
  await page.fill("#token", TOKEN_BAD);
  await page.selectOption("#stream", STREAM);
  await page.click("#subscribe");
  await page.waitForSelector('#status[data-state="refused"]', { timeout: WAIT });
  const refusedText = await status.textContent();
  check(/401/.test(refusedText) && /unauthorized/.test(refusedText),
        `refusal status shows 401 unauthorized, got: ${refusedText}`);
  const errBox = await page.textContent("#error");
  check(/"code":"unauthorized"/.test(errBox), `error box shows the JSON body, got: ${errBox}`);
  log("refusal shown: " + refusedText.trim());

  // 2. A good token: live, and the server's `ready` arrives as a row.
  await page.fill("#token", TOKEN_ALICE);
  await page.click("#subscribe");
  await page.waitForSelector('#status[data-state="live"]', { timeout: WAIT });
  await page.waitForSelector('#feed details.row[data-op="ready"]', { timeout: WAIT });
  check((await page.evaluate(() => sessionStorage.getItem("mongocast.viewer.token"))) === TOKEN_ALICE,
        "the token is kept in sessionStorage");
  check((await page.textContent("#who")).includes("alice"), "the header names the token's subject");

  // 3. Writes: alice (with an HTML payload), bob, alice. Only alice's reach her, in order.
  await step("insert-1");
  await page.waitForFunction(
    () => document.querySelectorAll('#feed details.row[data-op="insert"]').length >= 2,
    null, { timeout: WAIT });
  // Newest first: a bob row, had it leaked, would sit between them (delivery keeps order).
  const keys = await insertRows().evaluateAll((rows) => rows.map((r) => r.querySelector(".key").textContent));
  const recips = await insertRows().evaluateAll((rows) => rows.map((r) => r.querySelector(".recipient").textContent));
  check(keys.length === 2, `alice sees exactly 2 inserts, got ${JSON.stringify(keys)}`);
  check(keys[0].includes("a2") && keys[1].includes("a1"), `inserts newest first: ${JSON.stringify(keys)}`);
  check(recips.every((t) => t === "\u2192 alice"), `recipient column: ${JSON.stringify(recips)}`);
  // Quoted: the page also shows the test database's name, whose random hex suffix may hold "b1".
  const feedText = await page.textContent("#feed");
  check(!feedText.includes('"b1"') && !feedText.includes("bob's"), "bob's document never reaches alice");

  // Escaping: the HTML in the document is shown as text and never becomes markup.
  const a1 = insertRows().nth(1);
  await a1.locator("summary").click();
  const fullDoc = await a1.locator('pre[data-field="fullDocument"]').textContent();
  check(fullDoc.includes('"name": "<img src=x onerror=window.__xss=1>"'),
        `fullDocument pretty-printed with the raw HTML as text: ${fullDoc}`);
  // The stream's summary line, under the row, as text (the HTML in it stays text too).
  const line = await a1.locator("summary .line").textContent();
  check(line === "<img src=x onerror=window.__xss=1> (insert)", `summary line shown: ${line}`);
  check((await insertRows().nth(0).locator("summary .line").textContent()) === "second (insert)",
        "each row has its own summary line");
  check((await page.locator("#feed img").count()) === 0, "no <img> element was created");
  check((await page.evaluate(() => window.__xss)) === undefined, "no script ran from event data");
  await page.screenshot({ path: join(ARTIFACTS, SHOT), fullPage: true });
  if (TLS) {
    check(page.url().startsWith("https://"), `the page was loaded over https: ${page.url()}`);
    check(pageErrors.length === 0, `no JavaScript errors in the page: ${pageErrors.join("; ")}`);
    return;
  }

  // 4. Pause buffers (with a counter), resume shows what arrived meanwhile.
  await page.click("#pause");
  await step("insert-2");
  await page.waitForFunction(() => document.querySelector("#pause").textContent === "Resume (1)",
                             null, { timeout: WAIT });
  check((await insertRows().count()) === 2, "nothing is added to the feed while paused");
  await page.click("#pause");
  check((await insertRows().count()) === 3, "resume shows the buffered change");
  check((await page.textContent("#pause")) === "Pause", "pause button back to Pause");

  // 5. Update and delete: colour class per type, update description and pre-image shown.
  await step("update-delete");
  await page.waitForSelector('#feed details.row[data-op="delete"]', { timeout: WAIT });
  const upd = page.locator('#feed details.row[data-op="update"]');
  check((await upd.count()) === 1, "one update row");
  check(await upd.evaluate((r) => r.classList.contains("op-update")), "update row has its colour class");
  await upd.locator("summary").click();
  const ud = await upd.locator('pre[data-field="updateDescription"]').textContent();
  check(ud.includes('"quantity": 7'), `updateDescription shown: ${ud}`);
  const del = page.locator('#feed details.row[data-op="delete"]');
  check((await del.locator(".recipient").textContent()) === "\u2192 alice",
        "a delete is routed to alice through its pre-image");
  await del.locator("summary").click();
  const pre = await del.locator('pre[data-field="fullDocumentBeforeChange"]').textContent();
  check(pre.includes('"a3"'), `pre-image shown: ${pre}`);
  await page.screenshot({ path: join(ARTIFACTS, "viewer.png"), fullPage: true });

  // 6. The daemon restarts: the page reconnects by itself (since=<last id>) and goes on.
  await step("restart-daemon");
  await page.waitForSelector('#status[data-state="live"]', { timeout: 60000 });
  await step("insert-3");
  await page.waitForFunction(
    () => [...document.querySelectorAll('#feed details.row[data-op="insert"] .key')]
      .some((k) => k.textContent.includes("a4")), null, { timeout: WAIT });
  const afterKeys = await insertRows().evaluateAll((rows) => rows.map((r) => r.querySelector(".key").textContent));
  check(afterKeys.filter((k) => k.includes("a1")).length === 1,
        `resuming after the last id repeats nothing: ${JSON.stringify(afterKeys)}`);

  // 7. Clear empties the feed.
  await page.click("#clear");
  check((await page.locator("#feed details.row").count()) === 0, "clear empties the feed");

  check(pageErrors.length === 0, `no JavaScript errors in the page: ${pageErrors.join("; ")}`);
}

async function main() {
  mkdirSync(ARTIFACTS, { recursive: true });
  const profile = mkdtempSync(join(tmpdir(), "mongocast-chromium-"));
  // launchPersistentContext: Playwright refuses --user-data-dir in `args`, and this is how it
  // takes a profile directory of our own (fresh, removed afterwards).
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: "/usr/bin/chromium",
      headless: true,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"],
      viewport: { width: 1280, height: 900 },
      ignoreHTTPSErrors: TLS,
      timeout: 60000,
    });
  } catch (e) {
    rmSync(profile, { recursive: true, force: true });
    throw new Error(`Chromium could not be started from /usr/bin/chromium: ${e.message}`);
  }
  try {
    const page = context.pages()[0] || await context.newPage();
    try {
      await run(page);
    } catch (e) {
      await page.screenshot({ path: join(ARTIFACTS, "viewer-failure.png"), fullPage: true })
        .catch(() => {});
      throw e;
    }
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

main().then(() => {
  log("all checks passed");
  process.exit(0);
}, (e) => {
  process.stdout.write(`FAIL ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
