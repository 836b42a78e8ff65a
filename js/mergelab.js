// MergeLab frontend extension.
//
// 1. Block-weight editor: on every node of the category "MergeLab/block weights" that has one FLOAT
//    widget per block (the per-architecture nodes), a curve of the block values is drawn inside the
//    node; each point can be dragged up/down (Shift-drag paints across points), and a preset menu
//    applies the MBW presets.  The editor only writes the node's ordinary FLOAT widgets: it adds no
//    input, its own widgets are never serialized (neither into the prompt nor into widgets_values), so
//    API-format graphs and saved workflows are exactly what they are without this extension.
// 2. Method help: nodes of the category "MergeLab/methods" show their description (from the Python
//    parameter spec) as wrapped text inside the node; a click on its header folds it (kept in the node's
//    properties, so a saved workflow keeps it folded).
// In "Nodes 2.0" (DOM-rendered nodes) the curve and the help are left out; the preset menu stays.
// Each can be promoted onto a subgraph node ("Promote Widget"): ComfyUI's proxy widget then calls their
// draw/mouse with the subgraph node (its width, its y); they map the pointer with the geometry they were
// drawn with on that node, widen it to fit, and keep their state (the help's fold) in their own node.
//
// Everything is derived at run time from the node definitions the server sends (/object_info): which
// nodes, which widgets, the MBW name of each block (from the widget's display name) and the preset names
// (from the MBW node's preset list).

import { app } from "../../scripts/app.js";
import { knownPresets, presetForNames } from "./mergelab_presets.js";

const EXTENSION_NAME = "MergeLab.Frontend";
const BLOCK_CATEGORY = "MergeLab/block weights";
const METHOD_CATEGORY = "MergeLab/methods";
const MBW_NODE = "MergeLab_BlockWeightsMBW";
const CURVE_TYPE = "MERGELAB_BLOCK_CURVE";
const HELP_TYPE = "MERGELAB_METHOD_HELP";
const PRESET_PLACEHOLDER = "choose…";
// transforms of the current values (v: one value per block widget; blocks: their {name, group})
const ACTIONS = { "reset (all 1)": (v) => v.map(() => 1), "invert (1 − v)": (v) => v.map((x) => 1 - x),
                  "mirror (reverse order)": (v, blocks) => mirrorByGroup(v, blocks) };

/** The values in reverse order of their MBW groups: group i of n takes the values of group n − 1 − i
 *  (IN08 ↔ OUT00 on SDXL, M00 stays), each group's blocks in reverse order.  A plain reversal of the block
 *  list is the same only where mirrored groups hold as many blocks: SDXL's IN00 holds 3 (time_embed.,
 *  label_emb., input_blocks.0.) and OUT08 2 (output_blocks.8., out.), which shifted every OUT value by one
 *  block.  Where the counts differ, the target's blocks take the source's at the same relative position. */
function mirrorByGroup(values, blocks) {
    const groups = [];
    blocks.forEach((b, i) => {
        if (!groups.length || groups.at(-1).name !== b.group) groups.push({ name: b.group, at: [] });
        groups.at(-1).at.push(i);
    });
    const out = [...values];
    groups.forEach((g, gi) => {
        const src = [...groups[groups.length - 1 - gi].at].reverse();
        const k = g.at.length, m = src.length;
        g.at.forEach((idx, j) => { out[idx] = values[src[k > 1 ? Math.round((j * (m - 1)) / (k - 1)) : 0]]; });
    });
    return out;
}

const nodeDefs = {};   // MergeLab node definitions by name, from addCustomNodeDefs

const LG = () => globalThis.LiteGraph ?? {};
const color = (key, fallback) => LG()[key] ?? fallback;

// ------------------------------------------------------------------------------------------------
// node-definition helpers (object_info format: inputs as [type, options] or [[choices], options])
// ------------------------------------------------------------------------------------------------
function orderedInputs(nodeData) {
    const out = [];
    for (const section of ["required", "optional"]) {
        const inputs = nodeData?.input?.[section] ?? {};
        const order = nodeData?.input_order?.[section] ?? Object.keys(inputs);
        for (const name of order) if (inputs[name]) out.push([name, inputs[name]]);
    }
    return out;
}

/** The block inputs of a block-weight node: its FLOAT inputs, in definition order, with the MBW name
 *  taken from the display name ("IN04 input_blocks.4." -> IN04; none -> the block id itself). */
function blockInputs(nodeData) {
    if (nodeData?.category !== BLOCK_CATEGORY) return [];
    const blocks = [];
    for (const [name, spec] of orderedInputs(nodeData)) {
        if (!Array.isArray(spec) || spec[0] !== "FLOAT") continue;
        const opts = spec[1] ?? {};
        const label = opts.display_name ?? name;
        const group = label.endsWith(" " + name) ? label.slice(0, -name.length - 1).trim() : name;
        blocks.push({ name, label, group: group || name, min: opts.min ?? -Infinity, max: opts.max ?? Infinity,
                      step: opts.step ?? 0.01 });
    }
    return blocks.length >= 2 ? blocks : [];
}

function comboOptions(spec) {
    if (!Array.isArray(spec)) return [];
    if (Array.isArray(spec[0])) return spec[0];
    return spec[1]?.options ?? spec[1]?.values ?? [];
}

/** Preset names: the MBW node's preset list (the Python table) when the server defines that node,
 *  restricted to the presets mergelab_presets.js can compute. */
function presetNames() {
    const known = new Set(knownPresets());
    const def = nodeDefs[MBW_NODE];
    const fromServer = def ? comboOptions(def.input?.required?.preset).filter((n) => n !== "none") : null;
    return fromServer ? fromServer.filter((n) => known.has(n)) : [...known];
}

// ------------------------------------------------------------------------------------------------
// small drawing helpers
// ------------------------------------------------------------------------------------------------
function roundRect(ctx, x, y, w, h, r) {
    ctx.beginPath();
    if (ctx.roundRect) ctx.roundRect(x, y, w, h, r);
    else ctx.rect(x, y, w, h);
}

function decimalsOf(step) {
    const s = String(step);
    return s.includes(".") ? s.split(".")[1].length : 0;
}

// LiteGraph may copy a custom widget's own properties into a wrapper (LegacyWidget): make the
// methods it calls own properties, bound to the widget that holds the state.
function bindOwn(obj, methods) {
    for (const m of methods) obj[m] = obj[m].bind(obj);
}

function fmt(v) {
    return (Math.round(v * 100) / 100).toString();
}

/** "Nodes 2.0" (DOM-rendered nodes, LiteGraph.vueNodesMode) cannot give a canvas-drawn widget its height:
 *  the curve and the help were drawn under the block widgets there.  In that mode they are hidden (the
 *  DOM node skips widgets whose options say hidden) and draw nothing; the preset menu stays. */
const vueNodes = () => !!LG().vueNodesMode;

function widgetOptions() {
    return { serialize: false, get hidden() { return vueNodes(); } };
}

function markChanged(node) {
    node.setDirtyCanvas?.(true, true);
    if (node.graph) node.graph._version = (node.graph._version ?? 0) + 1;
    app.graph?.setDirtyCanvas?.(true, true);
}

// ------------------------------------------------------------------------------------------------
// block-weight curve editor
// ------------------------------------------------------------------------------------------------
const CURVE_HEIGHT = 170;
const MARGIN = 15;      // LiteGraph's widget margin
const AXIS_W = 30;      // room for the value labels
const HEAD_H = 20;      // title / hover read-out row
const FOOT_H = 16;      // group labels under the plot
const DRAG_SLOP = 3;    // pixels the pointer must move after a press before it changes a value
const CURVE_MIN_WIDTH = 420;   // width given to a node that shows the curve
const HELP_MIN_WIDTH = 360;    // ... the method help

/** The hover read-out on a node the curve is promoted onto: LiteGraph calls onMouseMove on the node
 *  under the pointer, which is the subgraph node, not the curve's own node. */
const hoverHooked = new WeakSet();
function hookHostHover(host) {
    if (hoverHooked.has(host)) return;
    hoverHooked.add(host);
    const curves = (n) => (n.widgets ?? []).filter((w) => w.type === CURVE_TYPE && typeof w.hoverAt === "function");
    const move = host.onMouseMove, leave = host.onMouseLeave;
    host.onMouseMove = function (e, pos, canvas) {
        const r = move?.call(this, e, pos, canvas);
        for (const w of curves(this)) w.hoverAt(pos, this);
        return r;
    };
    host.onMouseLeave = function (...args) {
        const r = leave?.apply(this, args);
        for (const w of curves(this)) w.hoverAt(null, this);
        return r;
    };
}

/** A subgraph node that shows a promoted curve / help is not sized for it (ComfyUI sizes it from its
 *  own inputs): widen it to `minWidth` and make it tall enough for its widgets.  Returns true if resized. */
function fitHost(host, minWidth) {
    if (!host?.size || !host.setSize) return false;
    const [w0, h0] = host.size;
    const w = Math.max(w0, minWidth);
    if (w !== w0) host.setSize([w, h0]);      // first the width: the help's height depends on it
    const h = Math.max(h0, (host.computeSize?.() ?? host.size)[1]);
    if (w === w0 && h === h0) return false;
    host.setSize([w, h]);
    host.setDirtyCanvas?.(true, true);
    return true;
}

class BlockCurveWidget {
    constructor(node, blocks) {
        this.type = CURVE_TYPE;
        this.name = "mergelab_block_curve";
        this.label = "block curve";
        this.serialize = false;                  // not in widgets_values
        this.options = widgetOptions();        // not in the API prompt; none in "Nodes 2.0"
        this.value = "";                        // nothing of its own: the FLOAT widgets hold the values
        this.y = 0;
        this.node = node;
        this.blocks = blocks;
        this.drag = null;                       // {index, range, paint}
        this.hover = -1;
        this.bodyNames = [...new Set(blocks.map((b) => b.group))];
        // where the curve was last drawn, per host node: its own node, or a subgraph node it is promoted
        // onto (ComfyUI's proxy widget calls draw/mouse with that node, its width and its y)
        this.hosts = new WeakMap();
        bindOwn(this, ["draw", "mouse", "computeSize", "hoverAt"]);
    }

    // -- the FLOAT widgets behind the points
    floatWidgets() {
        const byName = new Map((this.node.widgets ?? []).map((w) => [w.name, w]));
        return this.blocks.map((b) => byName.get(b.name));
    }

    isLinked(blockName) {
        return (this.node.inputs ?? []).some((i) => i.widget?.name === blockName && i.link != null);
    }

    values() {
        return this.floatWidgets().map((w) => (w ? Number(w.value) : NaN));
    }

    /** Sets block i to v through the widget (clamped to the input's range; rounded to its step when
     *  `snap`, as for values drawn with the mouse).  The FLOAT widget's own callback then applies the
     *  frontend's float rounding (Comfy.FloatRoundingPrecision), as for a value typed in. */
    setValue(i, v, e, snap = false) {
        const b = this.blocks[i];
        const w = this.floatWidgets()[i];
        if (!w || this.isLinked(b.name)) return false;
        v = Math.min(b.max, Math.max(b.min, v));
        if (snap) v = Number(v.toFixed(decimalsOf(b.step)));
        if (Number(w.value) === v) return false;
        const canvas = app.canvas;
        if (typeof w.setValue === "function" && canvas) {
            w.setValue(v, { e, node: this.node, canvas });
        } else {
            const old = w.value;
            w.value = v;
            w.callback?.(v, canvas, this.node, canvas?.graph_mouse, e);
            this.node.onWidgetChanged?.(w.name, v, old, w);
        }
        return true;
    }

    /** Writes all values (one per block); returns how many changed. */
    setValues(values, e) {
        let n = 0;
        values.forEach((v, i) => { if (Number.isFinite(v) && this.setValue(i, v, e)) n++; });
        if (n) markChanged(this.node);
        return n;
    }

    /** Applies a preset (or one of ACTIONS) by name; returns the number of changed widgets. */
    applyPreset(name, e) {
        if (ACTIONS[name]) return this.setValues(ACTIONS[name](this.values(), this.blocks), e);
        const perName = presetForNames(name, this.bodyNames);
        if (!perName) throw new Error(`MergeLab: unknown block-weight preset ${name}`);
        const byGroup = Object.fromEntries(this.bodyNames.map((n, i) => [n, perName[i]]));
        return this.setValues(this.blocks.map((b) => byGroup[b.group]), e);
    }

    // -- geometry (node-relative coordinates)
    computeSize(width) {
        return [width ?? this.node.size[0], vueNodes() ? 0 : CURVE_HEIGHT];
    }

    plotRect(width, y = this.y) {
        const w = width ?? this.node.size[0];
        const x0 = MARGIN + AXIS_W, x1 = w - MARGIN - 8;
        const y0 = y + HEAD_H + 6, y1 = y + CURVE_HEIGHT - FOOT_H - 4;
        return { x0, x1, y0, y1 };
    }

    range(values) {
        if (this.drag) return this.drag.range;
        const finite = values.filter(Number.isFinite);
        let lo = Math.min(0, ...finite), hi = Math.max(1, ...finite);
        lo = Math.floor(lo * 2) / 2;
        hi = Math.ceil(hi * 2) / 2;
        return [lo, hi];
    }

    xOf(i, r) {
        const n = this.blocks.length;
        return n > 1 ? r.x0 + (i / (n - 1)) * (r.x1 - r.x0) : (r.x0 + r.x1) / 2;
    }

    yOf(v, r, range) {
        const [lo, hi] = range;
        return r.y1 - ((v - lo) / (hi - lo)) * (r.y1 - r.y0);
    }

    valueAt(y, r, range) {
        const [lo, hi] = range;
        const t = (r.y1 - y) / (r.y1 - r.y0);
        return lo + Math.min(1, Math.max(0, t)) * (hi - lo);
    }

    indexAt(x, r) {
        const n = this.blocks.length;
        if (n < 2) return 0;
        const i = Math.round(((x - r.x0) / (r.x1 - r.x0)) * (n - 1));
        return Math.min(n - 1, Math.max(0, i));
    }

    /** The plot as last drawn on `host` (the curve's node, or a subgraph node it is promoted onto):
     *  the mouse must map positions with the width and y the curve was drawn with on that node. */
    hostRect(host = this.node) {
        const g = host ? this.hosts.get(host) : null;
        if (g) return this.plotRect(g.width, g.y);
        return this.plotRect(host && host !== this.node ? host.size?.[0] : undefined);
    }

    /** Node-relative position of point i on `host` (default: its own node; for tests and other extensions). */
    pointPos(i, host = this.node) {
        const r = this.hostRect(host);
        const values = this.values();
        return [this.xOf(i, r), this.yOf(values[i], r, this.range(values))];
    }

    // -- drawing
    draw(ctx, node, width, y) {
        if (vueNodes()) return;
        if (node && node !== this.node) {
            hookHostHover(node);
            if (fitHost(node, CURVE_MIN_WIDTH)) width = node.size[0];
        }
        this.y = y;
        if (node) this.hosts.set(node, { width, y });
        const r = this.plotRect(width);
        const values = this.values();
        const range = this.range(values);
        const [lo, hi] = range;
        ctx.save();
        // frame
        roundRect(ctx, MARGIN, y, width - 2 * MARGIN, CURVE_HEIGHT - 4, 6);
        ctx.fillStyle = color("WIDGET_BGCOLOR", "#222");
        ctx.fill();
        ctx.strokeStyle = color("WIDGET_OUTLINE_COLOR", "#666");
        ctx.stroke();
        // header: hovered / dragged point, else a hint
        const active = this.drag ? this.drag.index : this.hover;
        ctx.font = "12px Arial, sans-serif";
        ctx.textBaseline = "middle";
        ctx.textAlign = "left";
        if (active >= 0 && active < this.blocks.length) {
            const b = this.blocks[active];
            ctx.fillStyle = color("WIDGET_TEXT_COLOR", "#ddd");
            const linked = this.isLinked(b.name) ? "  (from input)" : "";
            ctx.fillText(`${b.label}: ${fmt(values[active])}${linked}`, MARGIN + 8, y + HEAD_H / 2 + 3);
        } else {
            ctx.fillStyle = color("WIDGET_SECONDARY_TEXT_COLOR", "#999");
            ctx.fillText("Block weights: drag a point · Shift-drag paints", MARGIN + 8, y + HEAD_H / 2 + 3);
        }
        // group bands (IN / M / OUT, D / S, ...) with their labels
        const groupOf = (g) => g.replace(/\d+$/, "") || g;
        let start = 0;
        let band = 0;
        ctx.font = "10px Arial, sans-serif";
        ctx.textAlign = "center";
        for (let i = 1; i <= this.blocks.length; i++) {
            if (i < this.blocks.length && groupOf(this.blocks[i].group) === groupOf(this.blocks[start].group)) continue;
            const half = this.blocks.length > 1 ? (r.x1 - r.x0) / (this.blocks.length - 1) / 2 : 10;
            const xa = Math.max(r.x0 - 4, this.xOf(start, r) - half), xb = Math.min(r.x1 + 4, this.xOf(i - 1, r) + half);
            if (band % 2 === 0) {
                ctx.fillStyle = "rgba(255,255,255,0.05)";
                ctx.fillRect(xa, r.y0 - 4, xb - xa, r.y1 - r.y0 + 8);
            }
            ctx.fillStyle = color("WIDGET_SECONDARY_TEXT_COLOR", "#999");
            const label = groupOf(this.blocks[start].group);
            if (ctx.measureText(label).width < xb - xa + 6) ctx.fillText(label, (xa + xb) / 2, r.y1 + 12);
            band++;
            start = i;
        }
        // horizontal grid: lo, 0, 0.5, 1, hi
        ctx.textAlign = "right";
        const ticks = [...new Set([lo, 0, 0.5, 1, hi])].filter((t) => t >= lo && t <= hi).sort((a, b) => a - b);
        for (const t of ticks) {
            const ty = this.yOf(t, r, range);
            ctx.strokeStyle = t === 0 || t === 1 ? "rgba(255,255,255,0.22)" : "rgba(255,255,255,0.09)";
            ctx.beginPath();
            ctx.moveTo(r.x0 - 4, ty);
            ctx.lineTo(r.x1 + 4, ty);
            ctx.stroke();
            ctx.fillStyle = color("WIDGET_SECONDARY_TEXT_COLOR", "#999");
            ctx.fillText(fmt(t), r.x0 - 7, ty);
        }
        // the curve
        ctx.strokeStyle = "#4fa3ff";
        ctx.lineWidth = 1.5;
        ctx.beginPath();
        let first = true;
        values.forEach((v, i) => {
            if (!Number.isFinite(v)) return;
            const px = this.xOf(i, r), py = this.yOf(Math.min(hi, Math.max(lo, v)), r, range);
            if (first) ctx.moveTo(px, py); else ctx.lineTo(px, py);
            first = false;
        });
        ctx.stroke();
        // the points
        values.forEach((v, i) => {
            if (!Number.isFinite(v)) return;
            const px = this.xOf(i, r), py = this.yOf(Math.min(hi, Math.max(lo, v)), r, range);
            const linked = this.isLinked(this.blocks[i].name);
            ctx.beginPath();
            ctx.arc(px, py, i === active ? 5 : 3.5, 0, Math.PI * 2);
            if (linked) {
                ctx.strokeStyle = "#888";
                ctx.lineWidth = 1;
                ctx.stroke();
            } else {
                ctx.fillStyle = i === active ? "#ffd24f" : "#9cc9ff";
                ctx.fill();
            }
        });
        ctx.restore();
    }

    /** Hover read-out (from the node's onMouseMove, which LiteGraph calls with no button pressed). */
    hoverAt(pos, host = this.node) {
        if (this.drag) return false;
        const r = this.hostRect(host);
        const [x, y] = pos ?? [-1, -1];
        const inside = x >= r.x0 - 8 && x <= r.x1 + 8 && y >= r.y0 - 8 && y <= r.y1 + 8;
        const h = inside ? this.indexAt(x, r) : -1;
        if (h === this.hover) return false;
        this.hover = h;
        host?.setDirtyCanvas?.(true, false);
        return true;
    }

    // -- pointer handling (LiteGraph calls mouse() on down, move while captured, and up)
    mouse(event, pos, node) {
        const type = event.type;
        const r = this.hostRect(node);
        const [x, y] = pos;
        const inside = x >= r.x0 - 8 && x <= r.x1 + 8 && y >= r.y0 - 8 && y <= r.y1 + 8;
        if (type === "pointerdown" || type === "mousedown") {
            if (!inside) return false;
            const values = this.values();
            const index = this.indexAt(x, r);
            // a press only picks the point: values change once the pointer moves, so that a click
            // (to select the node, say) changes nothing
            this.drag = { index, range: this.range(values), paint: !!event.shiftKey, from: [x, y], moved: false };
            this.drag.value = this.valueAt(y, r, this.drag.range);
            node.setDirtyCanvas?.(true, false);
            return true;
        }
        if (type === "pointermove" || type === "mousemove") {
            if (!this.drag) return this.hoverAt(pos, node);
            if (!this.drag.moved) {
                if (Math.hypot(x - this.drag.from[0], y - this.drag.from[1]) < DRAG_SLOP) return true;
                this.drag.moved = true;
            }
            const v = this.valueAt(y, r, this.drag.range);
            if (this.drag.paint || event.shiftKey) {
                // paint: every point between the previous and the current position gets a value on
                // the straight line between them (fast moves skip no point)
                const i = this.indexAt(x, r);
                const { index: j, value: u } = this.drag;
                const lo = Math.min(i, j), hi = Math.max(i, j);
                for (let k = lo; k <= hi; k++) {
                    const t = i === j ? 1 : (k - j) / (i - j);
                    this.setValue(k, u + (v - u) * t, event, true);
                }
                this.drag.index = i;
            } else {
                this.setValue(this.drag.index, v, event, true);
            }
            this.drag.value = v;
            markChanged(node);
            return true;
        }
        if (type === "pointerup" || type === "mouseup" || type === "pointercancel") {
            const was = !!this.drag;
            const moved = !!this.drag?.moved;
            this.drag = null;
            if (moved) {
                markChanged(node);
                app.graph?.change?.();
            }
            return was;
        }
        return false;
    }
}

/** Nodes 2.0: the subgraph nodes in the shown graph that show a widget of `node` promoted onto them.
 *  Their DOM rows are built from their own (proxy) widgets, keyed by the subgraph node, so a change
 *  made through the inner widget (setValue, its callback) never reaches them.  Frontend 1.32.9 re-reads
 *  a node's widgets for its DOM node only when the node is added to the graph: the graph's onNodeAdded
 *  (which the Nodes 2.0 node manager hooks) is called again for the host, which re-reads every widget's
 *  value (a proxy reads the inner widget's). */
function refreshVueHosts(node) {
    const shown = app.canvas?.graph ?? app.graph;
    for (const h of shown?._nodes ?? shown?.nodes ?? []) {
        if (h === node || !h.isSubgraphNode?.() || h.subgraph !== node.graph) continue;
        if (!(h.widgets ?? []).some((pw) => pw?._overlay && String(pw._overlay.nodeId) === String(node.id))) continue;
        try {       // frontend internals: a later frontend may not need or allow this; never break the pick
            if (typeof shown.onNodeAdded === "function") shown.onNodeAdded(h);
        } catch (e) {
            console.debug("MergeLab: could not refresh a subgraph node's promoted widgets", e);
        }
        h.setDirtyCanvas?.(true, true);
    }
}

function addPresetWidget(node, curve) {
    const names = [PRESET_PLACEHOLDER, ...Object.keys(ACTIONS), ...presetNames()];
    const w = node.addWidget("combo", "mergelab_block_preset", PRESET_PLACEHOLDER, (value) => {
        if (value && value !== PRESET_PLACEHOLDER) curve.applyPreset(value);
        if (!vueNodes() || value === PRESET_PLACEHOLDER) {
            w.value = PRESET_PLACEHOLDER;
            return;
        }
        // a DOM node's select shows what it last saw in the widget: let it see the preset's name first,
        // then the placeholder (a change it follows), so the menu is ready for the next pick
        w.value = value;
        refreshVueHosts(node);
        setTimeout(() => {
            if (typeof w.setValue === "function" && app.canvas) w.setValue(PRESET_PLACEHOLDER, { node, canvas: app.canvas });
            else w.value = PRESET_PLACEHOLDER;
            refreshVueHosts(node);
        }, 0);
    }, { values: names, serialize: false });
    w.label = "apply preset";
    w.serialize = false;
    w.options.serialize = false;
    w.tooltip = "Sets the block values from an MBW preset (supermerger's tables, mapped to this architecture " +
                "as the MBW node maps them) or transforms them; the values land in the block widgets below.";
    return w;
}

// ------------------------------------------------------------------------------------------------
// method help
// ------------------------------------------------------------------------------------------------
const HELP_FONT = "12px Arial, sans-serif";
const HELP_LINE = 16;
const HELP_FOLDED = "mergelab_help_folded";     // node property
let measureCtx = null;

function wrapText(text, width) {
    measureCtx ??= document.createElement("canvas").getContext("2d");
    measureCtx.font = HELP_FONT;
    const lines = [];
    for (const para of String(text).split("\n")) {
        if (!para.trim()) { lines.push(""); continue; }
        let line = "";
        for (const word of para.split(/\s+/)) {
            const next = line ? line + " " + word : word;
            if (line && measureCtx.measureText(next).width > width) {
                lines.push(line);
                line = word;
            } else {
                line = next;
            }
        }
        if (line) lines.push(line);
    }
    return lines;
}

class MethodHelpWidget {
    constructor(node, text) {
        this.type = HELP_TYPE;
        this.name = "mergelab_method_help";
        this.label = "method help";
        this.serialize = false;
        this.options = widgetOptions();        // as the curve's
        this.value = "";
        this.y = 0;
        this.node = node;
        this.text = text;
        this.folded = false;        // kept in node.properties (saved with the workflow, not in the prompt)
        this._cache = { width: -1, lines: [] };
        bindOwn(this, ["draw", "mouse", "computeSize"]);
    }

    lines(width) {
        const inner = Math.max(60, width - 2 * MARGIN - 16);
        if (this._cache.width !== inner) this._cache = { width: inner, lines: wrapText(this.text, inner) };
        return this._cache.lines;
    }

    /** The node the help is laid out on: its own node, or, while the canvas shows the graph of a subgraph
     *  node it is promoted onto, that node (LiteGraph's arrange() asks computeSize() with no width). */
    layoutNode() {
        if (this.sizingFor) return this.sizingFor;
        const h = this.host, shown = app.canvas?.graph;
        if (h && h !== this.node && shown && h.graph === shown && this.node.graph !== shown) return h;
        return this.node;
    }

    computeSize(width) {
        const w = this.layoutNode().size?.[0] ?? width ?? 300;
        if (vueNodes()) return [w, 0];
        return [w, this.folded ? HEAD_H + 6 : HEAD_H + 10 + this.lines(w).length * HELP_LINE];
    }

    draw(ctx, node, width, y) {
        if (vueNodes()) return;
        if (node && node !== this.node) {
            this.host = node;
            if (fitHost(node, HELP_MIN_WIDTH)) width = node.size[0];
        }
        this.y = y;
        const h = this.computeSize(width)[1] - 4;
        ctx.save();
        roundRect(ctx, MARGIN, y, width - 2 * MARGIN, h, 6);
        ctx.fillStyle = "rgba(0,0,0,0.25)";
        ctx.fill();
        ctx.strokeStyle = color("WIDGET_OUTLINE_COLOR", "#666");
        ctx.stroke();
        ctx.font = "bold 12px Arial, sans-serif";
        ctx.textBaseline = "middle";
        ctx.textAlign = "left";
        ctx.fillStyle = color("WIDGET_TEXT_COLOR", "#ddd");
        ctx.fillText(`${this.folded ? "▸" : "▾"} About this method`, MARGIN + 8, y + HEAD_H / 2 + 2);
        if (!this.folded) {
            ctx.font = HELP_FONT;
            ctx.textBaseline = "top";
            ctx.fillStyle = color("WIDGET_TEXT_COLOR", "#ccc");
            this.lines(width).forEach((line, i) => ctx.fillText(line, MARGIN + 8, y + HEAD_H + 4 + i * HELP_LINE));
        }
        ctx.restore();
    }

    mouse(event, pos, node) {
        if (event.type !== "pointerdown" && event.type !== "mousedown") return false;
        if (pos[1] > this.y + HEAD_H + 2) return false;
        this.folded = !this.folded;
        // the fold belongs to the help's own node (its properties are what a saved workflow keeps for it),
        // also when the click comes from a subgraph node the help is promoted onto
        this.node.properties ??= {};
        this.node.properties[HELP_FOLDED] = this.folded;
        const fit = (n) => {
            this.sizingFor = n;
            try {
                const min = n.computeSize();
                n.setSize([n.size[0], this.folded ? min[1] : Math.max(n.size[1], min[1])]);
            } finally {
                this.sizingFor = null;
            }
            markChanged(n);
        };
        fit(this.node);
        if (node && node !== this.node) fit(node);
        return true;
    }
}

// ------------------------------------------------------------------------------------------------
// wiring
// ------------------------------------------------------------------------------------------------
/** Moves the given widgets to the top of node.widgets (they are drawn first). */
function moveToTop(node, widgets) {
    node.widgets = [...widgets, ...node.widgets.filter((w) => !widgets.includes(w))];
}

/** widgets_values as without this extension: the values of the serializable widgets, in order.
 *  (LiteGraph writes widgets_values by widget index, leaving holes for unserialized widgets, but reads
 *  them back counting serializable widgets only; our widgets sit first, so the holes must go.) */
function compactWidgetValues(node, data) {
    if (!data || !Array.isArray(data.widgets_values) || !node.widgets) return;
    data.widgets_values = node.widgets.filter((w) => w.serialize !== false).map((w) => w.value);
}

function chain(proto, method, fn) {
    const orig = proto[method];
    proto[method] = function (...args) {
        const r = orig?.apply(this, args);
        fn.apply(this, args);
        return r;
    };
}

app.registerExtension({
    name: EXTENSION_NAME,

    async addCustomNodeDefs(defs) {
        for (const [name, def] of Object.entries(defs)) if (name.startsWith("MergeLab_")) nodeDefs[name] = def;
    },

    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData?.name?.startsWith("MergeLab_")) return;
        nodeDefs[nodeData.name] ??= nodeData;
        const blocks = blockInputs(nodeData);
        const help = nodeData.category === METHOD_CATEGORY && nodeData.description ? nodeData.description : null;
        if (!blocks.length && !help) return;

        chain(nodeType.prototype, "onNodeCreated", function () {
            const mine = [];
            if (help) {
                this.mergelabHelp = new MethodHelpWidget(this, help);
                mine.push(this.addCustomWidget(this.mergelabHelp));
            }
            if (blocks.length) {
                this.mergelabCurve = new BlockCurveWidget(this, blocks);
                mine.push(this.addCustomWidget(this.mergelabCurve));
                mine.push(addPresetWidget(this, this.mergelabCurve));
            }
            moveToTop(this, mine);
            // wide enough for the curve / the help text; the height follows from the widgets at that width
            const width = Math.max(this.size[0], help ? HELP_MIN_WIDTH : CURVE_MIN_WIDTH);
            this.setSize([width, this.size[1]]);
            this.setSize([width, this.computeSize()[1]]);
        });
        if (blocks.length) {
            chain(nodeType.prototype, "onMouseMove", function (e, pos) {
                if (!this.mergelabCurve?.drag) this.mergelabCurve?.hoverAt(pos);
            });
            chain(nodeType.prototype, "onMouseLeave", function () {
                this.mergelabCurve?.hoverAt(null);
            });
        }
        // a workflow saved without this extension (or generated) gives the node the size it had without
        // the editor/help: grow it so that nothing is drawn outside the node
        chain(nodeType.prototype, "onConfigure", function () {
            if (this.mergelabHelp) this.mergelabHelp.folded = !!this.properties?.[HELP_FOLDED];
            const min = this.computeSize();
            if (this.size[1] < min[1]) this.setSize([this.size[0], min[1]]);
        });
        chain(nodeType.prototype, "onSerialize", function (data) {
            compactWidgetValues(this, data);
        });
    },
});
