// Drives the ComfyUI web UI in headless Chromium (Debian's /usr/bin/chromium, through playwright-core)
// against a running ComfyUI server with MergeLab loaded, and writes what it saw to <out>/result.json.
// It asserts nothing itself: tests/browser/test_frontend.py starts the server, runs this script and
// checks the result.  With --docs it instead renders the README images into --docs-dir.
//
//   node frontend_check.mjs --url http://127.0.0.1:PORT/ --out DIR [--docs --docs-dir DIR]
//
// Environment: CHROMIUM (default /usr/bin/chromium).

import fs from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
    if (a.startsWith("--")) acc.push([a.slice(2), all[i + 1] && !all[i + 1].startsWith("--") ? all[i + 1] : true]);
    return acc;
}, []));
const BASE = String(args.url ?? "http://127.0.0.1:8188/").replace(/\/?$/, "/");
const OUT = path.resolve(String(args.out ?? "test-output/browser"));
const DOCS = !!args.docs;
const DOCS_DIR = path.resolve(String(args["docs-dir"] ?? "docs/images"));
const PACK = String(args.pack ?? "MergeLab");
const EXAMPLE_TIMEOUT_MS = Number(args["example-timeout"] ?? 300000);
// a JSON file {name: editor-format workflow}: each is opened and its API prompt recorded (step workflow_prompts)
const PROMPT_WORKFLOWS = args["prompt-workflows"] ? String(args["prompt-workflows"]) : null;
// the example workflows to queue (comma-separated names); the others are opened and checked only
const RUN_EXAMPLES = new Set(String(args.run ?? "").split(",").filter(Boolean));
fs.mkdirSync(OUT, { recursive: true });
for (const f of fs.readdirSync(OUT)) if (f.endsWith(".png")) fs.rmSync(path.join(OUT, f));   // last run's

const result = { url: BASE, steps: {}, console: [], pageErrors: [], failedRequests: [], screenshots: [] };
const save = () => fs.writeFileSync(path.join(OUT, "result.json"), JSON.stringify(result, null, 1));
const log = (...a) => console.log("[frontend_check]", ...a);

async function step(name, fn) {
    const t0 = Date.now();
    try {
        result.steps[name] = { ok: true, ...(await fn()) };
    } catch (e) {
        result.steps[name] = { ok: false, error: String(e?.stack ?? e) };
        log(`step ${name} failed:`, e?.message ?? e);
    }
    result.steps[name].ms = Date.now() - t0;
    save();
    return result.steps[name];
}

async function getJson(p) {
    const r = await fetch(BASE + p.replace(/^\//, ""));
    if (!r.ok) throw new Error(`GET ${p}: HTTP ${r.status}`);
    return r.json();
}

const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // the flags that keep Chromium off the (closed) network; see docs in environment.md
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
});
const context = await browser.newContext({ viewport: { width: 1400, height: 900 }, deviceScaleFactor: 1 });
// the "Nodes 2.0" banner is remembered in localStorage, not in the settings file
await context.addInitScript(() => localStorage.setItem("vueNodesBannerDismissed", "true"));
const page = await context.newPage();
page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") {
        result.console.push({ type: m.type(), text: m.text(), url: m.location()?.url ?? "" });
    }
});
page.on("pageerror", (e) => result.pageErrors.push({ text: String(e?.message ?? e), stack: String(e?.stack ?? "") }));
page.on("requestfailed", (r) => result.failedRequests.push({ url: r.url(), error: r.failure()?.errorText ?? "" }));

async function shot(name, opts = {}) {
    const file = path.join(OUT, name);
    await page.screenshot({ path: file, ...opts });
    result.screenshots.push(file);
    return file;
}

// client (page) coordinates of a point given relative to a node, at the current zoom
async function clientPos(nodeId, rel) {
    return page.evaluate(([id, [x, y]]) => {
        const app = window.app;
        const n = app.graph.getNodeById(id);
        const c = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + x, n.pos[1] + y]);
        const r = app.canvas.canvas.getBoundingClientRect();
        return [r.left + c[0], r.top + c[1]];
    }, [nodeId, rel]);
}

// a fresh graph with the view at zoom 1, no offset
async function resetGraph() {
    await page.evaluate(() => {
        const app = window.app;
        app.graph.clear();
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [0, 0];
        app.canvas.setDirty(true, true);
    });
}

async function addNode(type, pos) {
    return page.evaluate(([t, p]) => {
        const n = window.LiteGraph.createNode(t);
        if (!n) throw new Error(`cannot create node ${t}`);
        n.pos = p;
        window.app.graph.add(n);
        window.app.canvas.setDirty(true, true);
        return n.id;
    }, [type, pos]);
}

// a real click on the header of a method node's help (folds / unfolds it)
async function clickHelpHeader(nodeId) {
    const helpY = await page.evaluate((nid) => {
        const h = window.app.graph.getNodeById(nid).mergelabHelp;
        return h.last_y ?? h.y;
    }, nodeId);
    const [x, y] = await clientPos(nodeId, [60, helpY + 10]);
    await page.mouse.click(x, y);
    await redraw();
}

async function redraw() {
    await page.evaluate(() => window.app.canvas.draw(true, true));
    await page.waitForTimeout(50);
}

// ---------------------------------------------------------------------------------------------------
await step("load", async () => {
    // window.app is set when the frontend's setup has finished.  On a machine loaded with other work
    // this was once seen not to happen within minutes while a later load went through in seconds: one
    // reload is allowed, and recorded (the test prints it).
    let attempts = 0;
    for (;;) {
        attempts++;
        await page.goto(BASE, { waitUntil: "load", timeout: 120000 });
        const up = await page.waitForFunction(() => window.app?.graph && window.LiteGraph && window.app.canvas,
                                              null, { timeout: 120000 }).then(() => true, (e) => e);
        if (up === true) break;
        if (attempts >= 2) throw up;
        log("the UI did not finish its set-up; reloading once");
    }
    // the extensions load after the graph exists: wait until ours registered (or give up after 30 s)
    const registered = await page.waitForFunction(
        () => window.app.extensions?.some((e) => e.name === "MergeLab.Frontend"), null, { timeout: 30000 })
        .then(() => true, () => false);
    await page.waitForTimeout(1000);
    const info = await page.evaluate(() => ({
        extensions: window.app.extensions.map((e) => e.name),
        mergelabNodeTypes: Object.keys(window.LiteGraph.registered_node_types).filter((t) => t.startsWith("MergeLab_")).length,
        dialogs: [...document.querySelectorAll("[role=dialog]")].map((d) => d.innerText.slice(0, 80)),
    }));
    await shot("00_loaded.png");
    return { registered, attempts, ...info };
});

if (DOCS) {
    await renderDocsImages();
} else {
    await runChecks();
}
await browser.close();
save();
log("done:", Object.entries(result.steps).map(([k, v]) => `${k}=${v.ok ? "ok" : "FAILED"}`).join(" "));

// ---------------------------------------------------------------------------------------------------
async function runChecks() {
    let sd1 = null;

    await step("block_editor_drag", async () => {
        await resetGraph();
        sd1 = await addNode("MergeLab_BlockWeights_SD1", [300, 80]);
        await redraw();
        const before = await page.evaluate((id) => {
            const n = window.app.graph.getNodeById(id);
            const c = n.mergelabCurve;
            const r = c.plotRect();
            return { values: c.values(), names: c.blocks.map((b) => b.name), pos: [...n.pos], plotH: r.y1 - r.y0,
                     range: c.range(c.values()),
                     widgetOrder: n.widgets.map((w) => [w.name, w.type, w.serialize !== false, w.options?.serialize !== false]) };
        }, sd1);
        const index = 5;
        const p = await page.evaluate(([id, i]) => window.app.graph.getNodeById(id).mergelabCurve.pointPos(i), [sd1, index]);
        const [x, y] = await clientPos(sd1, p);
        const dy = 60;
        await page.mouse.move(x - 40, y + 20);
        await page.mouse.move(x, y, { steps: 4 });
        const hover = await page.evaluate((id) => window.app.graph.getNodeById(id).mergelabCurve.hover, sd1);
        await page.mouse.down();
        await page.mouse.move(x, y + dy / 2, { steps: 5 });
        await page.mouse.move(x, y + dy, { steps: 5 });
        await page.mouse.up();
        await redraw();
        const after = await page.evaluate((id) => {
            const n = window.app.graph.getNodeById(id);
            return { values: n.mergelabCurve.values(), pos: [...n.pos] };
        }, sd1);
        await shot("10_block_editor_drag.png");
        return { index, dy, before, after, hover };
    });

    await step("block_editor_paint", async () => {
        // Shift-drag from point 14 to point 20 at one height: every point in between takes the line's value
        const [a, b] = [14, 20];
        const pa = await page.evaluate(([id, i]) => window.app.graph.getNodeById(id).mergelabCurve.pointPos(i), [sd1, a]);
        const pb = await page.evaluate(([id, i]) => window.app.graph.getNodeById(id).mergelabCurve.pointPos(i), [sd1, b]);
        const [xa, ya] = await clientPos(sd1, pa);
        const [xb] = await clientPos(sd1, pb);
        const dy = 31;
        await page.keyboard.down("Shift");
        await page.mouse.move(xa, ya + dy);
        await page.mouse.down();
        await page.mouse.move(xb, ya + dy, { steps: 3 });
        await page.mouse.up();
        await page.keyboard.up("Shift");
        const values = await page.evaluate((id) => window.app.graph.getNodeById(id).mergelabCurve.values(), sd1);
        return { from: a, to: b, dy, values };
    });

    await step("serialization", async () => {
        return page.evaluate(async (id) => {
            const app = window.app;
            const n = app.graph.getNodeById(id);
            const ser = n.serialize();
            const prompt = await app.graphToPrompt();
            const floats = n.widgets.filter((w) => w.type === "number").map((w) => [w.name, w.value]);
            const workflow = app.graph.serialize();
            // round trip: reload the saved workflow; the values must come back into the same widgets
            await app.loadGraphData(structuredClone(workflow), true, true, null);
            const m = app.graph.getNodeById(id);
            return {
                widgetsValues: ser.widgets_values,
                serializableWidgets: n.widgets.filter((w) => w.serialize !== false).map((w) => [w.name, w.value]),
                promptInputs: prompt.output[String(id)]?.inputs,
                floats,
                reloaded: m ? m.widgets.filter((w) => w.type === "number").map((w) => [w.name, w.value]) : null,
                reloadedHasCurve: !!m?.mergelabCurve,
            };
        }, sd1);
    });

    await step("preset_menu", async () => {
        // apply a preset the way a user does: click the preset combo, pick the entry in the menu
        await resetGraph();
        const id = await addNode("MergeLab_BlockWeights_SDXL", [300, 60]);
        await redraw();
        const w = await page.evaluate((nid) => {
            const n = window.app.graph.getNodeById(nid);
            const pw = n.widgets.find((x) => x.name === "mergelab_block_preset");
            return { y: pw.last_y ?? pw.y, width: n.size[0], values: pw.options.values };
        }, id);
        const [x, y] = await clientPos(id, [w.width / 2, w.y + 10]);
        await page.mouse.click(x, y);
        const entry = page.locator(".litecontextmenu .litemenu-entry", { hasText: /^GRAD_V$/ });
        await entry.first().waitFor({ timeout: 5000 });
        await entry.first().click();
        await redraw();
        const got = await page.evaluate((nid) => {
            const n = window.app.graph.getNodeById(nid);
            const pw = n.widgets.find((x) => x.name === "mergelab_block_preset");
            return { values: n.mergelabCurve.values(), names: n.mergelabCurve.blocks.map((b) => b.name),
                     comboAfter: pw.value };
        }, id);
        await shot("20_preset_menu.png");
        return { menu: w.values, ...got, arch: "SDXL", preset: "GRAD_V" };
    });

    await step("preset_tables", async () => {
        // every preset on every architecture node, computed as the editor computes it
        return page.evaluate(async () => {
            const { presetForNames } = await import("/extensions/MergeLab/mergelab_presets.js");
            const app = window.app;
            app.graph.clear();
            const out = {};
            const types = Object.keys(window.LiteGraph.registered_node_types).filter((t) => t.startsWith("MergeLab_"));
            let offered = null;
            for (const t of types) {
                const n = window.LiteGraph.createNode(t);
                if (!n?.mergelabCurve) continue;
                app.graph.add(n);
                const c = n.mergelabCurve;
                offered ??= n.widgets.find((w) => w.name === "mergelab_block_preset").options.values;
                const presets = {};
                for (const p of offered) {
                    const v = presetForNames(p, c.bodyNames);
                    if (v) {
                        const byGroup = Object.fromEntries(c.bodyNames.map((g, i) => [g, v[i]]));
                        presets[p] = c.blocks.map((b) => byGroup[b.group]);
                    }
                }
                out[t] = { blocks: c.blocks.map((b) => b.name), groups: c.blocks.map((b) => b.group), presets };
                app.graph.remove(n);
            }
            return { nodes: out, offered };
        });
    });

    await step("method_help", async () => {
        await resetGraph();
        const id = await addNode("MergeLab_Method_ties", [200, 80]);
        await redraw();
        const info = await page.evaluate(async (nid) => {
            const app = window.app;
            const n = app.graph.getNodeById(nid);
            const h = n.mergelabHelp;
            const prompt = await app.graphToPrompt();
            return {
                description: n.constructor.nodeData?.description ?? null,
                text: h?.text ?? null,
                lines: h ? h.lines(n.size[0]) : [],
                firstWidget: n.widgets[0]?.name,
                height: n.size[1], helpY: h?.last_y ?? h?.y,
                widgetsValues: n.serialize().widgets_values,
                promptInputs: prompt.output[String(nid)]?.inputs,
            };
        }, id);
        await shot("30_method_help.png");
        // a click on the help header folds the text away
        await clickHelpHeader(id);
        const folded = await page.evaluate((nid) => {
            const n = window.app.graph.getNodeById(nid);
            return { folded: n.mergelabHelp.folded, height: n.size[1] };
        }, id);
        return { ...info, afterClick: folded };
    });

    await step("mirror", async () => {
        // "mirror" on an SD1 and an SDXL node: a single 0 at IN08, and the GRAD_V preset, each mirrored
        await resetGraph();
        return page.evaluate(() => {
            const out = {};
            for (const t of ["MergeLab_BlockWeights_SD1", "MergeLab_BlockWeights_SDXL"]) {
                const n = window.LiteGraph.createNode(t);
                window.app.graph.add(n);
                const c = n.mergelabCurve;
                const mirror = "mirror (reverse order)";
                const i8 = c.blocks.findIndex((b) => b.name === "input_blocks.8.");
                c.setValue(i8, 0);
                const single = c.values();
                c.applyPreset(mirror);
                const singleMirrored = c.values();
                c.applyPreset("GRAD_V");
                const grad = c.values();
                c.applyPreset(mirror);
                const gradMirrored = c.values();
                c.applyPreset(mirror);
                out[t] = { names: c.blocks.map((b) => b.name), groups: c.blocks.map((b) => b.group), single,
                           singleMirrored, grad, gradMirrored, gradTwice: c.values() };
                window.app.graph.remove(n);
            }
            return { nodes: out };
        });
    });

    await step("click_without_drag", async () => {
        // a click in the plot between two points (no movement) must not change any value
        await resetGraph();
        const id = await addNode("MergeLab_BlockWeights_SD1", [300, 80]);
        await redraw();
        const q = await page.evaluate((nid) => {
            const c = window.app.graph.getNodeById(nid).mergelabCurve;
            const a = c.pointPos(10), b = c.pointPos(11), r = c.plotRect();
            return { at: [(a[0] + b[0]) / 2, r.y1 - 5], before: c.values() };
        }, id);
        const [x, y] = await clientPos(id, q.at);
        await page.mouse.move(x, y);
        await page.mouse.down();
        await page.mouse.up();
        await redraw();
        const after = await page.evaluate((nid) => window.app.graph.getNodeById(nid).mergelabCurve.values(), id);
        return { before: q.before, after };
    });

    await step("help_fold_reload", async () => {
        // fold the method help, save the workflow, load it back: still folded, at the folded height
        await resetGraph();
        const id = await addNode("MergeLab_Method_ties", [200, 80]);
        await redraw();
        await clickHelpHeader(id);
        return page.evaluate(async (nid) => {
            const app = window.app;
            const n = app.graph.getNodeById(nid);
            const saved = { folded: n.mergelabHelp.folded, height: n.size[1] };
            await app.loadGraphData(structuredClone(app.graph.serialize()), true, true, null);
            const m = app.graph.getNodeById(nid);
            return { saved, reloaded: { folded: m.mergelabHelp.folded, height: m.size[1] } };
        }, id);
    });

    // a node converted to a subgraph, with some of its widgets promoted onto the subgraph node (as the
    // context menu's "Promote Widget" does: the subgraph node's proxyWidgets property)
    async function promotedSubgraph(type, widgetNames) {
        await resetGraph();
        const inner = await addNode(type, [300, 60]);
        const sg = await page.evaluate(async ([id, names]) => {
            const app = window.app;
            app.canvas.deselectAll?.();
            app.canvas.selectItems([app.graph.getNodeById(id)]);
            await app.extensionManager.command.execute("Comfy.Graph.ConvertToSubgraph");
            await new Promise((r) => setTimeout(r, 300));
            const n = app.graph._nodes.find((m) => m.isSubgraphNode?.());
            n.properties.proxyWidgets = names.map((w) => [String(id), w]);
            n.pos = [300, 60];
            app.canvas.setDirty(true, true);
            return n.id;
        }, [inner, widgetNames]);
        await redraw();
        await redraw();
        return { inner, sg };
    }

    await step("promoted_curve", async () => {
        // the block curve promoted onto a subgraph node: the node is widened for it, a drag on the subgraph
        // node changes the block under the pointer (also when the subgraph node is wider than the inner
        // node), and hovering there shows the read-out
        const { inner, sg } = await promotedSubgraph("MergeLab_BlockWeights_SD1", ["mergelab_block_curve", "mergelab_block_preset"]);
        const widthAfterPromotion = await page.evaluate((id) => window.app.graph.getNodeById(id).size[0], sg);
        await page.evaluate((id) => { const n = window.app.graph.getNodeById(id); n.setSize([620, n.size[1]]); }, sg);
        await redraw();
        // where the curve is drawn on the subgraph node: the proxy's y, the subgraph node's width
        const at = (i) => page.evaluate(([sgId, innerId, k]) => {
            const n = window.app.graph.getNodeById(sgId);
            const c = n.subgraph.getNodeById(innerId).mergelabCurve;
            const pw = n.widgets.find((w) => w.name.endsWith("mergelab_block_curve"));
            const r = c.plotRect(n.size[0]);
            r.y0 += pw.y - c.y; r.y1 += pw.y - c.y;
            const v = c.values();
            return { p: [c.xOf(k, r), c.yOf(v[k], r, c.range(v))], values: v, width: n.size[0], innerWidth: c.node.size[0] };
        }, [sg, inner, i]);
        const index = 20, dy = 50;
        const g = await at(index);
        const [x, y] = await clientPos(sg, g.p);
        await page.mouse.move(x, y);
        await page.mouse.down();
        await page.mouse.move(x, y + dy / 2, { steps: 4 });
        await page.mouse.move(x, y + dy, { steps: 4 });
        await page.mouse.up();
        await redraw();
        const after = await page.evaluate(([sgId, innerId]) => window.app.graph.getNodeById(sgId).subgraph.getNodeById(innerId).mergelabCurve.values(), [sg, inner]);
        const changed = after.map((v, i) => (v !== g.values[i] ? i : -1)).filter((i) => i >= 0);
        const h = await at(8);
        const [hx, hy] = await clientPos(sg, h.p);
        await page.mouse.move(hx - 30, hy + 10);
        await page.mouse.move(hx, hy, { steps: 4 });
        const hover = await page.evaluate(([sgId, innerId]) => window.app.graph.getNodeById(sgId).subgraph.getNodeById(innerId).mergelabCurve.hover, [sg, inner]);
        await page.mouse.move(5, 5);
        await shot("60_promoted_curve.png");
        return { widthAfterPromotion, width: g.width, innerWidth: g.innerWidth, index, changed, hoverIndex: 8, hover };
    });

    await step("promoted_help", async () => {
        // the method help promoted onto a subgraph node: drawn inside the node, a click on its header folds
        // it and the fold is kept (in the help's own node) through a save and reload
        const { inner, sg } = await promotedSubgraph("MergeLab_Method_ties", ["mergelab_method_help"]);
        const before = await page.evaluate(([sgId, innerId]) => {
            const n = window.app.graph.getNodeById(sgId), help = n.subgraph.getNodeById(innerId).mergelabHelp;
            const pw = n.widgets.find((w) => w.name.endsWith("mergelab_method_help"));
            // the help draws its text wrapped at the width it is drawn with: the subgraph node's
            const bottom = pw.y + 30 + help.lines(n.size[0]).length * 16;
            return { size: [...n.size], y: pw.y, bottom };
        }, [sg, inner]);
        const [x, y] = await clientPos(sg, [60, before.y + 10]);
        await page.mouse.click(x, y);
        await redraw();
        const clicked = await page.evaluate(([sgId, innerId]) => {
            const n = window.app.graph.getNodeById(sgId), m = n.subgraph.getNodeById(innerId);
            return { folded: m.mergelabHelp.folded, innerProperty: m.properties.mergelab_help_folded ?? null,
                     subgraphProperty: n.properties.mergelab_help_folded ?? null };
        }, [sg, inner]);
        const reloaded = await page.evaluate(async ([sgId, innerId]) => {
            const app = window.app;
            await app.loadGraphData(structuredClone(app.graph.serialize()), true, true, null);
            return { folded: app.graph.getNodeById(sgId).subgraph.getNodeById(innerId).mergelabHelp.folded };
        }, [sg, inner]);
        await resetGraph();
        return { before, clicked, reloaded };
    });

    await step("workflow_prompts", async () => {
        // ComfyUI's own templates (some with subgraphs): the prompt the frontend queues for each, for
        // the comparison with mergelab.workflow.to_api (python -m mergelab.run)
        if (!PROMPT_WORKFLOWS) return { prompts: {} };
        // what the frontend logs while it opens these (ComfyUI's templates hold links it reports as missing)
        // is kept with this step, apart from the page's messages that test_page_has_no_console_errors checks
        const consoleMark = result.console.length, errorMark = result.pageErrors.length;
        const workflows = JSON.parse(fs.readFileSync(PROMPT_WORKFLOWS, "utf-8"));
        const prompts = {};
        for (const [name, wf] of Object.entries(workflows)) {
            prompts[name] = await page.evaluate(async (w) => {
                const app = window.app;
                await app.loadGraphData(w, true, true, null, { showMissingNodesDialog: false, showMissingModelsDialog: false });
                return (await app.graphToPrompt()).output;
            }, wf);
        }
        // graphs made in the editor: subgraphs converted from a selection with the editor's command, and
        // what users then do with them (a widget wired to a subgraph input, set per instance on two instances
        // of one definition; a promoted inner widget; nesting; mute / bypass inside and of a subgraph node)
        const built = await page.evaluate(async () => {
            const app = window.app, sleep = (ms) => new Promise((r) => setTimeout(r, ms));
            const add = (type, values = {}, title) => {
                const n = window.LiteGraph.createNode(type);
                if (title) n.title = title;
                app.canvas.graph.add(n);
                for (const [k, v] of Object.entries(values)) n.widgets.find((w) => w.name === k).value = v;
                return n;
            };
            const link = (a, out, b, name) => a.connect(out, b, b.inputs.findIndex((i) => i.name === name));
            const command = async (id, items) => {
                app.canvas.deselectAll?.();
                app.canvas.selectItems(items);
                await app.extensionManager.command.execute(id);
                await sleep(300);
            };
            const convert = async (items) => {
                await command("Comfy.Graph.ConvertToSubgraph", items);
                return [...app.canvas.selectedItems].find((x) => x.isSubgraphNode?.());
            };
            const inner = (sg, title) => sg.subgraph.nodes.find((n) => n.title === title);
            // two checkpoints, merge M1 (a, b), merge M2 (M1, b), saved
            const chain = () => {
                app.graph.clear();
                const a = add("CheckpointLoaderSimple", { ckpt_name: "a.safetensors" });
                const b = add("CheckpointLoaderSimple", { ckpt_name: "b.safetensors" });
                const m1 = add("ModelMergeSimple", { ratio: 0.1 }, "M1"), m2 = add("ModelMergeSimple", { ratio: 0.9 }, "M2");
                const save = add("ModelSave", { filename_prefix: "sg/merged" });
                link(a, 0, m1, "model1"); link(b, 0, m1, "model2"); link(m1, 0, m2, "model1"); link(b, 0, m2, "model2");
                link(m2, 0, save, "model");
                return { a, b, m1, m2, save };
            };
            const out = {};
            const record = async (name) => {
                const workflow = structuredClone(app.graph.serialize());
                out[name] = { workflow, prompt: structuredClone((await app.graphToPrompt()).output) };
            };

            // M1's ratio wired to a new subgraph input: a widget on the subgraph node; a second instance of the
            // same definition (Clone) feeding a second save, each instance with its own value
            let g = chain();
            let sg = await convert([g.m1]);
            const m1 = inner(sg, "M1");
            sg.subgraph.inputNode.emptySlot.connect(m1.inputs.find((i) => i.name === "ratio"), m1);
            await sleep(100);
            sg.widgets.find((w) => w.name === "ratio").value = 0.77;
            const twin = sg.clone();
            app.graph.add(twin);
            link(g.a, 0, twin, "model1"); link(g.b, 0, twin, "model2");
            const save2 = add("ModelSave", { filename_prefix: "sg/twin" });
            link(twin, 0, save2, "model");
            twin.widgets.find((w) => w.name === "ratio").value = 0.33;
            await record("widget_per_instance");

            // M2's ratio promoted onto the subgraph node of [M1, M2] (proxyWidgets) and set there to 0.6
            g = chain();
            sg = await convert([g.m1, g.m2]);
            sg.properties.proxyWidgets = [[String(inner(sg, "M2").id), "ratio"]];
            await sleep(100);
            inner(sg, "M2").widgets.find((w) => w.name === "ratio").value = 0.6;
            await record("promoted_widget");

            // nested: M1 converted, then [that subgraph node, M2] converted again
            g = chain();
            const s1 = await convert([g.m1]);
            await convert([s1, g.m2]);
            await record("nested");

            // modes: M2 bypassed inside the subgraph of [M1, M2]; then a second subgraph node muted (Ctrl+M)
            g = chain();
            sg = await convert([g.m1, g.m2]);
            inner(sg, "M2").mode = 4;
            const m3 = add("ModelMergeSimple", { ratio: 0.5 }, "M3");
            link(g.a, 0, m3, "model1"); link(g.b, 0, m3, "model2");
            const muted = await convert([m3]);
            link(muted, 0, add("ModelSave", { filename_prefix: "sg/muted" }), "model");
            await command("Comfy.Canvas.ToggleSelectedNodes.Mute", [muted]);
            await record("modes");
            return out;
        });
        await resetGraph();
        await page.waitForTimeout(500);
        return { prompts, built, console: result.console.splice(consoleMark),
                 pageErrors: result.pageErrors.splice(errorMark) };
    });

    await step("examples", async () => {
        const templates = await getJson("workflow_templates");
        const names = templates[PACK] ?? [];
        const runs = [];
        for (const name of names) {
            const t0 = Date.now();
            runs.push(await openAndRunExample(name));
            result.examplesSoFar = runs;
            save();
            log(`example ${name}: ${runs.at(-1).error ? "error" : "ok"} in ${(Date.now() - t0) / 1000} s`);
        }
        return { templates, names, runs };
    });

    await step("vue_nodes", async () => {
        // "Nodes 2.0" (DOM-rendered nodes): the canvas-drawn editor and help are left out, everything else
        // (the preset menu included) is there; the setting is switched back afterwards
        const setting = (on) => page.evaluate((v) => window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", v), on);
        await setting(true);
        try {
            await page.waitForTimeout(500);
            await resetGraph();
            const ids = [await addNode("MergeLab_BlockWeights_SDXL", [50, 60]), await addNode("MergeLab_Method_ties", [600, 60])];
            await page.waitForFunction((n) => document.querySelectorAll("[data-node-id]").length >= n, ids.length, { timeout: 30000 });
            await page.waitForTimeout(1000);
            await shot("50_vue_nodes.png");
            const nodes = await page.evaluate((list) => list.map((id) => {
                const el = document.querySelector(`[data-node-id="${id}"]`);
                const n = window.app.graph.getNodeById(id);
                return { type: n.type, canvases: el?.querySelectorAll("canvas").length ?? null,
                         widgetRows: el?.querySelectorAll(".lg-node-widget").length ?? null,
                         widgets: n.widgets.map((w) => w.name), text: el?.innerText ?? "" };
            }), ids);
            // the preset menu, used as a user does there: open the select, pick; twice, so the second pick
            // needs the menu back at its placeholder
            const rows = page.locator(`[data-node-id="${ids[0]}"] .lg-node-widget`);
            const picks = [];
            for (const name of ["GRAD_V", "GRAD_A"]) {
                await rows.filter({ hasText: "apply preset" }).first().locator("[role=combobox], .p-select").first().click();
                await page.locator("[role=option]", { hasText: new RegExp(`^${name}$`) }).first().click();
                await page.waitForTimeout(500);
                picks.push(await page.evaluate(([nid, preset]) => {
                    const el = document.querySelector(`[data-node-id="${nid}"]`);
                    const n = window.app.graph.getNodeById(nid);
                    const row = (label) => [...el.querySelectorAll(".lg-node-widget")].find((r) => r.innerText.includes(label));
                    return { preset, menuShows: row("apply preset")?.innerText.replace(/\s+/g, " ").trim(),
                             values: n.mergelabCurve.values(), names: n.mergelabCurve.blocks.map((b) => b.name),
                             shown: n.mergelabCurve.blocks.map((b) => Number(row(b.name)?.querySelector("input")?.value)) };
                }, [ids[0], name]));
            }
            return { nodes, picks };
        } finally {
            await setting(false);
        }
    });

    await step("vue_promoted_preset", async () => {
        // "Nodes 2.0": the preset menu promoted onto a subgraph node returns to its placeholder after a pick,
        // so the same preset can be picked again (after the values were changed)
        const { inner, sg } = await promotedSubgraph("MergeLab_BlockWeights_SD1", ["mergelab_block_preset"]);
        const setting = (on) => page.evaluate((v) => window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", v), on);
        await setting(true);
        try {
            await page.waitForFunction((id) => document.querySelector(`[data-node-id="${id}"] .lg-node-widget`), sg, { timeout: 30000 });
            await page.waitForTimeout(1000);
            const read = () => page.evaluate(([sgId, innerId]) => {
                const el = document.querySelector(`[data-node-id="${sgId}"]`);
                const row = [...el.querySelectorAll(".lg-node-widget")].find((r) => r.innerText.includes("apply preset"));
                return { menuShows: row?.innerText.replace(/\s+/g, " ").trim() ?? null,
                         values: window.app.graph.getNodeById(sgId).subgraph.getNodeById(innerId).mergelabCurve.values() };
            }, [sg, inner]);
            const pick = async (name) => {
                const row = page.locator(`[data-node-id="${sg}"] .lg-node-widget`).filter({ hasText: "apply preset" }).first();
                await row.locator("[role=combobox], .p-select").first().click();
                await page.locator("[role=option]", { hasText: new RegExp(`^${name}$`) }).first().click();
                await page.waitForTimeout(800);
                return { pick: name, ...(await read()) };
            };
            const first = await pick("COSINE");
            await page.evaluate(([sgId, innerId]) => window.app.graph.getNodeById(sgId).subgraph.getNodeById(innerId).mergelabCurve.applyPreset("reset (all 1)"), [sg, inner]);
            const reset = await read();
            const again = await pick("COSINE");
            await shot("61_vue_promoted_preset.png");
            return { first, reset, again };
        } finally {
            await setting(false);
            await resetGraph();
        }
    });
}

// Workflow > Browse Templates > Extensions > <pack> > the card of `name`
async function openFromDialog(name) {
    await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
    const dialog = page.getByRole("dialog");
    // the pack's entry under "Extensions" in the dialog's side bar (below the fold: scroll to it)
    const navItem = dialog.getByRole("button").filter({ has: page.getByText(PACK, { exact: true }) }).first();
    await navItem.scrollIntoViewIfNeeded({ timeout: 60000 });
    await navItem.click({ timeout: 60000 });
    // the card shows the template's file name as its title
    await dialog.getByText(name, { exact: true }).first().click({ timeout: 60000 });
    await page.waitForFunction(() => window.app.graph._nodes.length > 0 &&
        !document.querySelector("[role=dialog]"), null, { timeout: 60000 });
}

// what the dialog does with a custom-node template (frontend 1.32.9, useTemplateWorkflows): fetch
// /api/workflow_templates/<pack>/<name>.json and app.loadGraphData(json, clean, restore view, name)
async function openLikeDialog(name) {
    await page.evaluate(async ([pack, n]) => {
        const r = await fetch(`/api/workflow_templates/${encodeURIComponent(pack)}/${encodeURIComponent(n)}.json`);
        if (!r.ok) throw new Error(`template ${n}: HTTP ${r.status}`);
        await window.app.loadGraphData(await r.json(), true, true, n, { openSource: "template" });
    }, [PACK, name]);
    await page.waitForFunction(() => window.app.graph._nodes.length > 0, null, { timeout: 60000 });
}

async function openAndRunExample(name) {
    const run = { name };
    try {
        await resetGraph();
        run.queued = RUN_EXAMPLES.has(name);
        run.via = run.queued ? "dialog" : "api";
        if (run.queued) await openFromDialog(name);
        else await openLikeDialog(name);
        await page.waitForTimeout(300);
        const expected = await getJson(`api/workflow_templates/${encodeURIComponent(PACK)}/${encodeURIComponent(name)}.json`);
        Object.assign(run, await page.evaluate((exp) => {
            const nodes = window.app.graph._nodes;
            return {
                loadedTypes: nodes.map((n) => n.type).sort(),
                expectedTypes: (exp.nodes ?? []).map((n) => n.type).sort(),
                unknownTypes: nodes.map((n) => n.type).filter((t) => !window.LiteGraph.registered_node_types[t]),
                // MergeLab nodes with the editor or the help: is the node tall enough for its widgets?
                ourNodes: nodes.filter((n) => n.mergelabCurve || n.mergelabHelp).map((n) => ({
                    type: n.type, height: n.size[1], needed: n.computeSize()[1] })),
            };
        }, expected));
        await shot(`40_example_${name.replace(/[^\w.-]+/g, "_")}_loaded.png`);
        if (!run.queued) return run;
        const before = new Set(Object.keys(await getJson("history")));
        const runButton = page.getByRole("button", { name: "Run", exact: true });
        await runButton.first().click();
        const t0 = Date.now();
        let entry = null, id = null;
        while (Date.now() - t0 < EXAMPLE_TIMEOUT_MS) {
            const h = await getJson("history");
            id = Object.keys(h).find((k) => !before.has(k));
            if (id && (h[id].status?.completed || h[id].status?.status_str === "error")) { entry = h[id]; break; }
            if (!id) {
                // a prompt that fails validation never reaches the history: the frontend reports it
                const rejected = await page.evaluate(() => {
                    const errs = window.app.lastNodeErrors;
                    const dialog = document.querySelector("[role=dialog]");
                    return (errs && Object.keys(errs).length) || dialog
                        ? { nodeErrors: errs ?? null, dialog: dialog?.innerText?.slice(0, 1500) ?? null } : null;
                });
                if (rejected) { run.rejected = rejected; break; }
            }
            await page.waitForTimeout(500);
        }
        run.promptId = id;
        run.seconds = (Date.now() - t0) / 1000;
        run.status = entry?.status ?? null;
        run.outputs = entry ? Object.keys(entry.outputs ?? {}) : [];
        run.queueErrors = await page.evaluate(() =>
            [...document.querySelectorAll(".p-toast-message, [role=dialog]")].map((d) => d.innerText.slice(0, 400)));
        await shot(`41_example_${name.replace(/[^\w.-]+/g, "_")}_done.png`);
    } catch (e) {
        run.error = String(e?.stack ?? e);
        await shot(`49_example_${name.replace(/[^\w.-]+/g, "_")}_error.png`).catch(() => {});
    }
    return run;
}

// ---------------------------------------------------------------------------------------------------
// README images
async function frameNodes(ids, pad = 18) {
    await redraw();
    const clip = await frameNodesOnce(ids, pad);
    if (clip.width < 100 || clip.height < 100) throw new Error(`nodes ${ids} not laid out yet: ${JSON.stringify(clip)}`);
    await page.waitForTimeout(150);
    return clip;
}

async function frameNodesOnce(ids, pad) {
    // puts the nodes' bounding box at (170, 150) of the page (clear of the menus over the canvas), zoom 1,
    // and returns the clip rectangle around it
    return page.evaluate(([nodeIds, p]) => {
        const app = window.app;
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        for (const id of nodeIds) {
            const b = app.graph.getNodeById(id).getBounding();
            x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
        }
        const r = app.canvas.canvas.getBoundingClientRect();
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [170 - r.left - x0, 150 - r.top - y0];
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
        const top = p + 14;     // the node-source badge sits above the title bar
        return { x: 170 - p, y: 150 - top, width: x1 - x0 + 2 * p, height: y1 - y0 + p + top };
    }, [ids, pad]);
}

async function renderDocsImages() {
    fs.mkdirSync(DOCS_DIR, { recursive: true });
    await page.setViewportSize({ width: 1700, height: 1300 });
    await page.evaluate(async () => {
        const s = window.app.extensionManager.setting;
        await s.set("Comfy.Minimap.Visible", false);
    }).catch(() => {});
    await page.waitForTimeout(500);
    await step("docs_method_node", async () => {
        await resetGraph();
        const id = await addNode("MergeLab_Method_ties", [0, 0]);
        const clip = await frameNodes([id]);
        const file = path.join(DOCS_DIR, "method_node.png");
        await page.waitForTimeout(100);
        await page.screenshot({ path: file, clip });
        return { file, clip };
    });
    await step("docs_block_editor", async () => {
        await resetGraph();
        const id = await addNode("MergeLab_BlockWeights_SD1", [0, 0]);
        await page.evaluate((nid) => {
            const c = window.app.graph.getNodeById(nid).mergelabCurve;
            c.applyPreset("SMOOTHSTEP*2");
            c.hover = 13;
        }, id);
        const clip = await frameNodes([id]);
        clip.height = Math.min(clip.height, 500);      // the curve, the preset menu and the first blocks
        const file = path.join(DOCS_DIR, "block_weight_editor.png");
        await page.waitForTimeout(100);
        await page.screenshot({ path: file, clip });
        return { file };
    });
    await step("docs_merger", async () => {
        await resetGraph();
        const ids = await page.evaluate(() => {
            const app = window.app, LG = window.LiteGraph;
            const mk = (t) => { const n = LG.createNode(t); app.graph.add(n); return n; };
            const ckA = mk("CheckpointLoaderSimple"), ckB = mk("CheckpointLoaderSimple");
            const inA = mk("MergeLab_MergeInput"), inB = mk("MergeLab_MergeInput");
            const method = mk("MergeLab_Method_ties"), merger = mk("MergeLab_ModelMerger");
            const save = mk("MergeLab_SaveCheckpoint");
            const column = (x, nodes, gap = 40) => {
                let y = 0;
                for (const n of nodes) { n.pos = [x, y]; y += n.size[1] + gap + LG.NODE_TITLE_HEIGHT; }
            };
            const names = ckA.widgets.find((w) => w.name === "ckpt_name")?.options?.values ?? [];
            if (names.length >= 2) { ckA.widgets[0].value = names[0]; ckB.widgets[0].value = names[1]; }
            column(0, [ckA, ckB], 80);
            column(ckA.size[0] + 60, [inA, inB]);
            const x3 = ckA.size[0] + inA.size[0] + 120;
            column(x3, [method, merger]);
            save.pos = [x3 + merger.size[0] + 60, merger.pos[1]];
            const link = (a, out, b, input) => a.connect(a.outputs.findIndex((o) => o.name === out), b,
                                                        b.inputs.findIndex((i) => i.name === input));
            link(ckA, "MODEL", inA, "model");
            link(ckB, "MODEL", inB, "model");
            link(inA, "models", inB, "models");
            link(inB, "models", merger, "models");
            link(method, "method", merger, "method");
            link(ckA, "MODEL", merger, "base");
            const saveIn = save.inputs.find((i) => i.type === "MODEL");
            if (saveIn) link(merger, "MODEL", save, saveIn.name);
            const w = inB.widgets.find((x) => x.name === "weight");
            if (w) w.value = 0.6;
            app.canvas.setDirty(true, true);
            return [ckA, ckB, inA, inB, method, merger, save].map((n) => n.id);
        });
        const clip = await frameNodes(ids);
        const file = path.join(DOCS_DIR, "merger.png");
        await page.waitForTimeout(100);
        await page.screenshot({ path: file, clip });
        return { file, clip };
    });
}
