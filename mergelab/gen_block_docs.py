"""Generate ``engine/block_tables.json`` and ``docs/blocks.md`` from the real key lists.

    python -m mergelab.gen_block_docs            # rewrite both files
    python -m mergelab.gen_block_docs --check    # exit 1 when either is out of date

Every architecture of :mod:`mergelab.fixtures` is built full-size on the meta device with ComfyUI's own
classes; its ``diffusion_model.*`` keys go through ``engine.blocks`` (block derivation, MBW names), so
the table the nodes use and the documentation both say what the code does.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from . import REPO_ROOT

DOC_PATH = os.path.join(REPO_ROOT, "docs", "blocks.md")


def _blocks_module():
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from engine import blocks
    return blocks


def collect_variants() -> Tuple[List[Dict[str, Any]], Dict[str, str], Dict[str, float], str]:
    """``(variants, failures {arch: error}, seconds per arch, ComfyUI version)`` for every fixture arch."""
    from . import comfy_env, fixtures
    fixtures._comfy()
    version = comfy_env.comfyui_version()
    variants, failures, seconds = [], {}, {}
    for name in fixtures.available_architectures():
        spec = fixtures.arch_spec(name)
        t0 = time.perf_counter()
        try:
            keys = list(fixtures.meta_unet_shapes(name))
        except Exception as e:  # a fixture that does not build is reported in the docs, not fatal
            failures[name] = f"{type(e).__name__}: {e}"
            continue
        seconds[name] = time.perf_counter() - t0
        variants.append({"name": name, "config_class": spec.config_class, "unet_config": spec.unet_config,
                         "description": spec.description, "keys": keys})
    return variants, failures, seconds, version


def table_json(table: Mapping[str, Any]) -> str:
    """The committed form: one line per arch field, so diffs stay readable."""
    lines = ["{", f'  "comfyui_version": {json.dumps(table["comfyui_version"])},',
             f'  "generator": {json.dumps(table["generator"])},', '  "archs": {']
    archs = list(table["archs"].items())
    for i, (arch, info) in enumerate(archs):
        lines.append(f"    {json.dumps(arch)}: {{")
        fields = list(info.items())
        for j, (k, v) in enumerate(fields):
            if k == "variants":
                lines.append('      "variants": [')
                for n, var in enumerate(v):
                    lines.append("        " + json.dumps(var, separators=(",", ":")) + ("," if n < len(v) - 1 else ""))
                lines.append("      ]" + ("," if j < len(fields) - 1 else ""))
            else:
                lines.append(f"      {json.dumps(k)}: {json.dumps(v)}" + ("," if j < len(fields) - 1 else ""))
        lines.append("    }" + ("," if i < len(archs) - 1 else ""))
    lines += ["  }", "}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    s = f"{v:.3f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _arch_rows(blocks_mod, arch: str, info: Mapping[str, Any], counts: Mapping[str, Mapping[str, int]]):
    """Rows ``(block cell, MBW cell, keys cell)``, runs of alike stack blocks folded into one row."""
    names = blocks_mod.mbw_name_of_block(arch)
    variants = [v["name"] for v in info["variants"]]
    ref = variants[0]
    rows: List[List[Any]] = []
    for b in info["blocks"]:
        have = [v for v in variants if b in counts[v]]
        c0 = counts[have[0]][b]
        differ = [f"{v}: {counts[v][b]}" for v in have if counts[v][b] != c0]
        keys = str(c0) + (f" ({'; '.join(differ)})" if differ else "")
        if have[0] != ref and len(variants) > 1:
            keys += f" [{have[0]}]"
        lacking = [v for v in variants if v not in have]
        note = f"not in {', '.join(lacking)}" if lacking else ""
        st = blocks_mod.stack_of(b)
        prev = rows[-1] if rows else None
        if (st and prev and prev[5] is not None and prev[5][0] == st[0] and prev[5][1] + 1 == st[1]
                and prev[3] == keys and prev[4] == note):
            prev[1] = b
            prev[2].append(names.get(b, ""))
            prev[5] = st
            prev[6] += 1
            continue
        rows.append([b, b, [names.get(b, "")], keys, note, st, 1])
    out = []
    for first, last, mbw, keys, note, _, n in rows:
        cell = f"`{first}`" if n == 1 else f"`{first}` … `{last}`"
        m = [x for x in dict.fromkeys(mbw)]
        mcell = ", ".join(m) if len(m) <= 2 else f"{m[0]} … {m[-1]}"
        kcell = keys if n == 1 else f"{keys} each"
        out.append((cell, mcell, kcell + (f" — {note}" if note else "")))
    return out


def render_markdown(table: Mapping[str, Any], variants: Sequence[Mapping[str, Any]], failures: Mapping[str, str],
                    seconds: Mapping[str, float]) -> str:
    blocks = _blocks_module()
    counts = {v["name"]: blocks.block_counts(v["keys"]) for v in variants}
    L: List[str] = []
    w = L.append
    w("# Blocks of every architecture")
    w("")
    w(f"Generated by `python -m mergelab.gen_block_docs` from the real key lists of ComfyUI "
      f"{table['comfyui_version']}'s models (every architecture built full-size on the meta device). "
      "Do not edit by hand; `python -m mergelab.gen_block_docs --check` fails when this file is stale.")
    w("")
    w("## How keys are grouped into blocks")
    w("")
    w("Blocks are derived from a model's keys by one rule (`engine.blocks.block_of`), never listed per model:")
    w("")
    w("1. Strip `diffusion_model.`.")
    w("2. If the key starts with `<name>.<N>.` or `<name>.block<N>.` (regex `^([A-Za-z_]+)\\.(block)?(\\d+)\\.`) and "
      "`<name>` is a *stack* (ends in `blocks` or `layers`, or is `middle_block`), the block is that prefix: "
      "`input_blocks.4.`, `double_blocks.12.`, `blocks.block7.`, `joint_blocks.0.`.")
    w("3. Otherwise the block is the first path component plus a dot (`time_embed.`, `img_in.`, "
      "`final_layer.`), or the whole name for a bare parameter (`scale_shift_table`, `pos_embed`). "
      "Numbered layers of one `nn.Sequential` (`time_embed.0.`, `time_embed.2.`, `out.2.`) stay in one block, "
      "like ComfyUI's own `ModelMergeSD1` groups them.")
    w("")
    w("Prefixes end with a dot, so `input_blocks.1.` never matches `input_blocks.10.`; every key is in exactly "
      "one block. Blocks are listed in first-appearance (module registration) order. CLIP keys follow the same "
      "rule: `clip_l.`, `clip_g.`, `clip_h.`, `t5xxl.`.")
    w("")
    w("An *architecture* groups ComfyUI config classes whose keys share one block naming; its block-weights node "
      "(`MergeLab_BlockWeights_<arch>`) shows the union of their blocks, and a variant simply has no keys in "
      "the blocks it lacks (\"not in ...\" below). The variants are the configurations listed per architecture; "
      "ComfyUI can detect others from a checkpoint's keys (for example SD3 with a `context_processor.`). When "
      "a model has a block its node does not list, those keys keep factor 1 and the merger warns, naming "
      "them; a Block Rules node can set them.")
    w("")
    w("## MBW names")
    w("")
    w("MBW strings follow supermerger's conventions where it has them, and the same idea elsewhere:")
    w("")
    w("* **UNets** (SD1, SD2, SDXL, ...): `BASE, IN00.., M00, OUT00..` — 26 values for SD1/SD2, 20 for SDXL. "
      "`BASE` is the text encoder (CLIP keys), `time_embed.`/`label_emb.` belong to **IN00** (supermerger and "
      "sd-meh; sd-mecha puts them in BASE), `out.` to the last OUT, all of `middle_block.0-2.` to M00. "
      "supermerger's SDXL `VAE` value is not part of the string: MODEL merges have no VAE.")
    w("* **Flux**: `CLIP, T5, IN, D00-D18, S00-S37, OUT` — 61 values as in supermerger. `IN` is every block "
      "before the first double block (`img_in.`, `time_in.`, `vector_in.`, `guidance_in.`, `txt_in.`), `OUT` "
      "is `final_layer.`; CLIP and T5 scale the `clip_l.` and `t5xxl.` keys of a CLIP merge.")
    w("* **Other DiTs**: `IN` (non-stack blocks before the first stack), one name per stack block — a code "
      "from the stack's name (`joint_blocks` J, `double_blocks` D, `single_blocks` S, `blocks` B, "
      "`transformer_blocks` T, `layers` L, `double_stream_blocks` DS ...) plus its index — and `OUT` (every "
      "non-stack block after the last stack, in registration order); a non-stack block between two stacks, "
      "and every block of a model without stacks, gets its own name (`DOWN_DOWNSCALERS`, `TRANSFORMER`). "
      "No text-encoder names.")
    w("")
    w("Presets are supermerger's 26-value SD1 tables (below). On SDXL-like UNets with fewer blocks "
      "supermerger's `weighttoxl` rule applies (the first N IN values, M00, the first N OUT values); on any "
      "other layout BASE goes to the text-encoder names and the 25 UNet values are resampled linearly over "
      "the remaining names in order.")
    w("")
    w("## Nodes, rules and what a factor does")
    w("")
    w("Every block-weights node outputs a `BLOCK_WEIGHTS` (an immutable `engine.blocks.BlockWeights`) for the "
      "`block_weights` input of a MergeLab merger. A factor **multiplies one merge-method parameter** for every "
      "key of its block: `param` picks it (`weight` by default; any float parameter a method declares: "
      "`density`, `t`, `lambda`, ...), `models` picks the merged models it applies to (`all`, `1,3`, `2-4`; "
      "1 = the merger's first model input). 1 leaves the parameter as it is, 0 zeroes it; values below 0 and "
      "above 1 are allowed. Several block weights on the same parameter multiply.")
    w("")
    w("* `Block Weights (<arch>)`: one value per block listed below.")
    w("* `Block Weights (MBW string)`: an architecture, a preset and/or a string: one value per MBW name "
      "(`0,1,1,...`), one value for all (`0.5`), or named values and ranges (`IN00:0.3, M00:1, OUT03-OUT05:0`; "
      "names not given keep the preset's value, or 1). A wrong count is an error naming the expected count.")
    w("* `Block Weights (rules)`: one rule per line, `re:<regex>=<factor>` (Python `re.search`) or "
      "`glob:<pattern>=<factor>` (`fnmatch` on the whole key, `*` crosses dots; `glob:` may be left out), "
      "matched against the key without `diffusion_model.`. **The last matching rule wins**; keys no rule "
      "matches keep 1. Rules fit any architecture.")
    w("* `Combine Block Weights`, or the `combine_with` input of every node: keep several at once.")
    w("")
    w("The merger checks the architecture: block weights made for SDXL refuse an SD1 model with a message "
      "naming both.")
    w("")
    w("## Architectures")
    w("")
    w("| arch | title | config classes | blocks | MBW values |")
    w("|---|---|---|---|---|")
    for arch, info in table["archs"].items():
        classes = ", ".join(dict.fromkeys(v["config_class"] for v in info["variants"]))
        w(f"| [{arch}](#{arch.lower()}) | {info['title']} | {classes} | {len(info['blocks'])} | "
          f"{len(blocks.mbw_names(arch))} |")
    w("")
    for arch, info in table["archs"].items():
        w(f"### {arch}")
        w("")
        names = blocks.mbw_names(arch)
        w(f"{info['title']}. Node `MergeLab_BlockWeights_{arch}`; MBW string: {len(names)} "
          f"value{'s' if len(names) != 1 else ''} ({blocks._layout_text(arch)}).")
        w("")
        w("| variant | config class | description | keys | blocks |")
        w("|---|---|---|---|---|")
        for v in info["variants"]:
            w(f"| {v['name']} | {v['config_class']} | {v['description']} | {v['n_keys']} | "
              f"{len(info['blocks']) - len(v['missing'])} |")
        w("")
        tes = blocks.TEXT_ENCODER_NAMES.get(arch, ())
        if tes:
            w("Text-encoder names (CLIP keys): " + "; ".join(
                f"**{n}** = {', '.join(f'`{b}`' for b in ids) or '(no text encoder)'}" for n, ids in tes) + ".")
            w("")
        w("| block | MBW | keys |")
        w("|---|---|---|")
        for cell, mcell, kcell in _arch_rows(blocks, arch, info, counts):
            w(f"| {cell} | {mcell} | {kcell} |")
        w("")
    if failures:
        w("## Fixtures that did not build")
        w("")
        for name, err in failures.items():
            w(f"* {name}: {err}")
        w("")
    w("## Presets (SD1, 26 values: BASE, IN00-IN11, M00, OUT00-OUT11)")
    w("")
    w("Names as in supermerger's `mbwpresets_master.txt`; sd-meh's names are accepted too ("
      + ", ".join(f"`{a}`" for a in blocks.PRESET_ALIASES) + ").")
    w("")
    w("| preset | values |")
    w("|---|---|")
    for name, vals in blocks.PRESETS.items():
        w(f"| `{name}` | {', '.join(_fmt(v) for v in vals)} |")
    w("")
    w(f"Building the {len(seconds)} meta models of this page takes 10-40 s (it depends on the machine and its "
      "load), which is why the nodes read the generated `engine/block_tables.json` instead of building them "
      "at ComfyUI start-up.")
    w("")
    return "\n".join(L)


def generate() -> Tuple[str, str, Dict[str, float]]:
    """``(table json text, markdown text, seconds per arch)``."""
    blocks = _blocks_module()
    variants, failures, seconds, version = collect_variants()
    table = blocks.build_tables(variants, version)
    old = blocks._tables.get("table")
    blocks._tables["table"] = table          # the MBW names of the docs come from this very table
    blocks._layout_cache.clear()
    try:
        md = render_markdown(table, variants, failures, seconds)
    finally:
        blocks.reset_tables()
        if old is not None:
            blocks._tables["table"] = old
    return table_json(table), md, seconds


def _strip_timing(md: str) -> str:
    return "\n".join(line for line in md.splitlines() if not line.startswith("Building the "))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = ap.parse_args(argv)
    prev = logging.root.manager.disable
    logging.disable(logging.WARNING)        # ComfyUI's per-model log lines; restored (tests call main())
    try:
        blocks = _blocks_module()
        table_text, md, seconds = generate()
    finally:
        logging.disable(prev)
    targets = [(blocks.TABLE_PATH, table_text, lambda s: s), (DOC_PATH, md, _strip_timing)]
    if args.check:
        stale = []
        for path, text, norm in targets:
            try:
                with open(path, encoding="utf-8") as f:
                    if norm(f.read()) == norm(text):
                        continue
            except OSError:
                pass
            stale.append(os.path.relpath(path, REPO_ROOT))
        if stale:
            print(f"out of date: {', '.join(stale)}; run `python -m mergelab.gen_block_docs`", file=sys.stderr)
            return 1
        print("block tables and docs are up to date")
        return 0
    for path, text, _ in targets:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {os.path.relpath(path, REPO_ROOT)}")
    print(f"built {len(seconds)} meta models in {sum(seconds.values()):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
