// MergeLab: the MBW presets for the block-weight editor.
//
// The presets are supermerger's SD1 tables (26 values: BASE, IN00-IN11, M00, OUT00-OUT11), the same
// ones engine/blocks.py defines as PRESETS, and presetForBlocks() maps a table onto an architecture's
// MBW names the way engine/blocks.py preset_values() does (SD1/SD2/SDXL-style UNets by name, any other
// layout by linear resampling in block order).  The Python table is the reference:
// tests/browser/test_frontend.py compares every preset on every architecture with preset_values()
// through the running frontend, so the two cannot drift apart unnoticed.
//
// This module has no side effects: ComfyUI loads every .js file under js/ as an extension module, and
// this one only defines exports for mergelab.js.

const smoothstep = (x) => x * x * (3 - 2 * x);

// triangle wave of period 2: 0..1 up, 1..2 down
function fold(v) {
    v = ((v % 2) + 2) % 2;
    return v <= 1 ? v : 2 - v;
}

// BASE = 0, then fn over the 25 UNet blocks at x = 0, 1/24, ..., 1
const curve = (fn) => [0, ...Array.from({ length: 25 }, (_, i) => fn(i / 24))];
const steps = (text) => text.split(",").map(Number);
const repeat = (v, n) => Array(n).fill(v);

const TRUE_HERMITE = steps(
    "0,0,0.199031876929012,0.325761959876543,0.424641927083333,0.498456790123457,0.549991560570988,0.58203125," +
    "0.597360869984568,0.598765432098765,0.589029947916667,0.570939429012346,0.547278886959876,0.520833333333333," +
    "0.49438777970679,0.470727237654321,0.45263671875,0.442901234567901,0.444305796682099,0.459635416666667," +
    "0.491675106095678,0.543209876543211,0.617024739583333,0.715904706790124,0.842634789737655,1");
const fakeHermite = (x) => (19 / 3) * x ** 3 - 9.5 * x ** 2 + (25 / 6) * x;

export const SD1_LAYOUT = ["BASE", ...Array.from({ length: 12 }, (_, i) => `IN${String(i).padStart(2, "0")}`), "M00",
    ...Array.from({ length: 12 }, (_, i) => `OUT${String(i).padStart(2, "0")}`)];

export const PRESET_TABLES = {
    GRAD_V: curve((x) => Math.abs(1 - 2 * x)),
    GRAD_A: curve((x) => 1 - Math.abs(1 - 2 * x)),
    FLAT_25: [0, ...repeat(0.25, 25)],
    FLAT_75: [0, ...repeat(0.75, 25)],
    WRAP08: [0, ...repeat(1, 4), ...repeat(0, 17), ...repeat(1, 4)],
    WRAP12: [0, ...repeat(1, 6), ...repeat(0, 13), ...repeat(1, 6)],
    WRAP14: [0, ...repeat(1, 7), ...repeat(0, 11), ...repeat(1, 7)],
    WRAP16: [0, ...repeat(1, 8), ...repeat(0, 9), ...repeat(1, 8)],
    MID12_50: [...repeat(0, 6), ...repeat(0.5, 14), ...repeat(0, 6)],
    OUT07: [...repeat(0, 19), ...repeat(1, 7)],
    OUT12: [...repeat(0, 14), ...repeat(1, 12)],
    OUT12_5: [...repeat(0, 13), 0.5, ...repeat(1, 12)],
    RING08_SOFT: steps("0,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0"),
    RING08_5: steps("0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0,1,1,1,1,0,0,0,0,0,0"),
    RING10_5: steps("0,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0"),
    RING10_3: steps("0,0,0,0,0,0,0,1,1,1,1,1,0,0,0,1,1,1,1,1,0,0,0,0,0,0"),
    SMOOTHSTEP: curve(smoothstep),
    REVERSE_SMOOTHSTEP: curve((x) => 1 - smoothstep(x)),
};
for (const n of [2, 3, 4]) {
    PRESET_TABLES[`SMOOTHSTEP*${n}`] = curve((x) => fold(n * smoothstep(x)));
    PRESET_TABLES[`R_SMOOTHSTEP*${n}`] = curve((x) => 1 - fold(n * smoothstep(x)));
}
for (const n of [2, 3, 4]) {
    PRESET_TABLES[`SMOOTHSTEP/${n}`] = curve((x) => smoothstep(fold(n * x)));
    PRESET_TABLES[`R_SMOOTHSTEP/${n}`] = curve((x) => 1 - smoothstep(fold(n * x)));
}
Object.assign(PRESET_TABLES, {
    COSINE: curve((x) => (1 + Math.cos(Math.PI * x)) / 2),
    REVERSE_COSINE: curve((x) => (1 - Math.cos(Math.PI * x)) / 2),
    TRUE_CUBIC_HERMITE: TRUE_HERMITE,
    TRUE_REVERSE_CUBIC_HERMITE: [0, ...TRUE_HERMITE.slice(1).map((v) => 1 - v)],
    FAKE_CUBIC_HERMITE: curve(fakeHermite),
    FAKE_REVERSE_CUBIC_HERMITE: curve((x) => 1 - fakeHermite(x)),
    ALL_A: repeat(0, 26),
    ALL_B: repeat(1, 26),
});

const UNET_NAME = /^(IN\d\d|M00|OUT\d\d)$/;

/**
 * Values of preset `name` for the MBW names of an architecture's UNet/DiT blocks (text-encoder names
 * such as BASE, CLIP, T5 excluded), in block order.  Returns null for a preset this file does not know.
 * Same rule as engine/blocks.py preset_values(): names that all exist in the SD1 layout (SD1, SD2,
 * SDXL's IN00-IN08/M00/OUT00-OUT08 = supermerger's weighttoxl) take the table's value by name; any
 * other layout resamples the 25 UNet values linearly over its names (IN first, OUT last).
 */
export function presetForNames(name, bodyNames) {
    const table = PRESET_TABLES[name];
    if (!table) return null;
    const sd1 = Object.fromEntries(SD1_LAYOUT.map((n, i) => [n, table[i]]));
    if (bodyNames.every((n) => UNET_NAME.test(n) && n in sd1)) {
        return bodyNames.map((n) => sd1[n]);
    }
    const src = table.slice(1);
    const m = bodyNames.length;
    return bodyNames.map((_, i) => {
        const pos = m > 1 ? (i / (m - 1)) * (src.length - 1) : 0;
        const lo = Math.floor(pos);
        const hi = Math.min(lo + 1, src.length - 1);
        return src[lo] + (src[hi] - src[lo]) * (pos - lo);
    });
}

export function knownPresets() {
    return Object.keys(PRESET_TABLES);
}
