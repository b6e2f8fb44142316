"""Join per-variant GPU benchmark JSONs into one report (JSON + Markdown).

    python benchmarks/merge_reports.py prefill benchmarks/results/prefill_3b_{e2e,swa,full,hybrid,ttt_kvb,gated_deltanet,mamba2}.json --out benchmarks/results/prefill_variants_3b
    python benchmarks/merge_reports.py decode benchmarks/results/decode_variants_760m.json --out benchmarks/results/decode_variants_760m
    python benchmarks/merge_reports.py small benchmarks/results/variants_small_h200_{e2e,swa,full,hybrid,ttt_kvb}.json --out benchmarks/results/variants_small_h200 --missing-note TEXT

``prefill`` takes one ``tttlm bench prefill`` JSON per variant (each variant ran in its own
process, so each has its own env and command) and writes ``OUT.json`` (every input row, each
input's title/env/notes under its variant, a computed summary) and ``OUT.md`` (one table of the
variants against each other). ``decode`` takes one ``tttlm bench decode`` JSON and writes
``OUT.md`` and ``OUT.json`` (the input's content, rows untouched, plus a computed summary; with
``--out`` naming the input's own stem this adds the summary in place). ``small`` takes one
``benchmarks/variants_small.py`` JSON per variant (one process per variant, all with the same
settings, machine and torch) and writes one table of loss by position for all of them, naming
the variants that have no input (``--missing-note`` says why).

Every figure in the tables and the "Reading" paragraphs is computed from the inputs (the
paragraphs are templates over those numbers, so a rerun on new results cannot leave a stale
figure in the prose). The one exception is the prefill report's "Runs" notes (PREFILL_RUNS,
PREFILL_RECOMPILE below), which record how the committed 3b runs were made and are only true of
them. Inputs are named by file name only, so no machine path ends up in a committed report.
"""  # noqa: E501  (the usage lines are commands to copy whole)

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tttlm.files import atomic_write_text

ENV_KEYS = ("device", "torch", "triton", "cuda", "python")
# Display names of the SDPA backends a `full` run is split into, in table order (cuDNN first:
# it is the faster one on Hopper, which the "best full" column is measured against).
SDPA_NAMES = {"default": "", "cudnn": "cuDNN", "flash": "flash", "efficient": "mem-efficient",
              "math": "math"}
# Variants whose mixed-in blocks are recurrent (tttlm.config.RECURRENT): the fixed-state
# baselines e2e is compared with in the Reading paragraphs.
RECURRENT = ("ttt_kvb", "gated_deltanet", "mamba2")
# A cost ratio across context lengths at or below this counts as "flat" in the Reading text:
# the run-to-run spread of these timings is a few percent, so 10% separates noise from growth.
FLAT = 1.10
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight", 9: "nine", 10: "ten"}

# The seven variants benchmarks/variants_small.py trains (its VARIANTS; not imported, since that
# script pulls in torch), in its order: the `small` report names those that have no input.
SMALL_VARIANTS = ("e2e", "swa", "full", "hybrid", "ttt_kvb", "gated_deltanet", "mamba2")
# What every `small` input must share for one table to compare them (settings must match whole).
SMALL_ENV_KEYS = ("machine", "python", "torch", "train_tokens_per_variant")
# e2e's first-window loss this far below full's says the gap is mostly faster early training.
EARLY_GAP = 0.1

# What happened around the runs, which the JSONs cannot say. Kept with the script (not typed into
# the .md by hand) so a rerun of the merge reproduces the committed report; torch/Triton and
# e2e's 128K figure are filled in from the inputs.
PREFILL_RUNS = (
    "Three calls on H200 machines of one kind, all with torch {torch} and Triton {triton}: "
    "ttt_kvb and hybrid in the first; e2e, swa and full in the second (the same machine, still "
    "warm); gated_deltanet and mamba2 in the third, on a fresh machine, after a fix that gives "
    "fla's kernels q, k and v in one dtype under autocast. Each variant ran in its own process "
    "(`PART=variants` of benchmarks/pending_gpu.sh), compiled blocks, 2 timed repeats after "
    "warm-up, median. Compare across calls with that in mind: the full/swa/e2e rows share one "
    "machine.")
# The 0.0553-0.0595 range is from earlier runs of the same command, which are not inputs here.
PREFILL_RECOMPILE = (
    "During e2e at 128K, torch.compile hit its recompile limit (8) on the TTT blocks' output "
    "function (a requires_grad mismatch between chunks) and fell back to eager for it; e2e's "
    "128K figure ({e2e_longest} s/1K) is above the 0.0553-0.0595 of earlier runs of the same "
    "command.")


# ------------------------------------------------------------------------------ helpers
def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    missing = {"title", "env", "rows"} - set(data)
    if missing:
        sys.exit(f"{path.name}: missing {sorted(missing)}; is it a tttlm bench report?")
    return data


def sig(x: float, digits: int = 4) -> str:
    """``x`` to ``digits`` significant digits, never in exponent form (the table's s/1K)."""
    text = f"{x:#.{digits}g}"  # "#" keeps trailing zeros: 0.02620, not 0.0262
    return text if "e" not in text else f"{x:.{digits}f}"


def times(x: float) -> str:
    return f"{x:.2f}x"


def klabel(tokens: int) -> str:
    """8192 -> "8K"; the tables name context lengths the way the text does."""
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def count_word(n: int) -> str:
    return NUMBER_WORDS.get(n, str(n))


def short_device(device: str) -> str:
    return device.removeprefix("NVIDIA ")


def span(values: Iterable[float], fmt: Any = times) -> str:
    """"a-b" for a range of values, or the one value when they all print alike."""
    values = sorted(values)
    low, high = fmt(values[0]), fmt(values[-1])
    return low if low == high else f"{low}-{high}"


def join_words(words: Sequence[str]) -> str:
    words = list(words)
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} and {words[-1]}"


def env_section(envs: dict[str, dict[str, Any]]) -> tuple[dict[str, Any] | None, list[str]]:
    """The shared environment (None if the inputs differ) and its Markdown lines."""
    shared = {k: next(iter(envs.values())).get(k) for k in ENV_KEYS}
    if all(all(env.get(k) == shared[k] for k in ENV_KEYS) for env in envs.values()):
        lines = [f"Environment, identical for all {count_word(len(envs))} inputs:", ""]
        lines += [f"- {k}: `{shared[k]}`" for k in ENV_KEYS]
        return shared, lines
    # Different machines or software: a merged table would compare unlike runs, so say which
    # input ran where instead of hiding it behind one env block.
    lines = ["Environment differs between inputs:", "",
             "| variant | " + " | ".join(ENV_KEYS) + " |",
             "|---|" + "---|" * len(ENV_KEYS)]
    lines += [f"| {name} | " + " | ".join(f"`{env.get(k)}`" for k in ENV_KEYS) + " |"
              for name, env in envs.items()]
    return None, lines


def write_outputs(out: Path, report: dict[str, Any], markdown: str) -> None:
    # OUT is a stem: appending (not with_suffix) keeps a dotted name such as "run.v2" whole.
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    atomic_write_text(md_path, markdown)
    print(f"wrote {json_path} and {md_path}")


# ------------------------------------------------------------------------------ prefill
def label(variant: str, sdpa: str) -> str:
    name = SDPA_NAMES.get(sdpa, sdpa)
    return f"{variant} ({name})" if name else variant


def prefill_summary(rows: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """One entry per table line (variant, or variant + SDPA backend), in input order."""
    lengths = sorted({r["tokens"] for r in rows})
    if len(lengths) < 2:
        sys.exit("prefill: the report compares context lengths; the inputs hold only "
                 f"{lengths}")
    longest, previous = lengths[-1], lengths[-2]
    fulls = [r for r in rows if r["variant"] == "full"]
    if not fulls:
        sys.exit("prefill: no `full` rows among the inputs; the table is measured against full")
    best_full = {}
    for n in lengths:
        at_n = [r for r in fulls if r["tokens"] == n]
        if at_n:
            best = min(at_n, key=lambda r: r["s_per_1k_tokens"])
            best_full[str(n)] = {"sdpa": best["sdpa"], "s_per_1k_tokens": best["s_per_1k_tokens"]}
    if str(longest) not in best_full:
        sys.exit(f"prefill: no `full` row at {longest} tokens to compare with")

    order = list(SDPA_NAMES)
    lines = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        backends = sorted({r["sdpa"] for r in mine},
                          key=lambda s: order.index(s) if s in order else len(order))
        for sdpa in backends:
            by_len = {r["tokens"]: r for r in mine if r["sdpa"] == sdpa}
            s1k = {str(n): by_len[n]["s_per_1k_tokens"] for n in lengths if n in by_len}
            peak = {str(n): by_len[n]["peak_gib"] for n in lengths if n in by_len}
            entry: dict[str, Any] = {"label": label(variant, sdpa), "variant": variant,
                                     "sdpa": sdpa, "s_per_1k_tokens": s1k, "peak_gib": peak,
                                     "vs_best_full_longest": None,
                                     "longest_over_previous": None}
            if str(longest) in s1k:
                entry["vs_best_full_longest"] = (best_full[str(longest)]["s_per_1k_tokens"]
                                                 / s1k[str(longest)])
                if str(previous) in s1k:
                    entry["longest_over_previous"] = s1k[str(longest)] / s1k[str(previous)]
            lines.append(entry)
    tokens_per_step = sorted({r["tokens"] * r["batch"] for r in rows})
    # Batch per length, for the memory sentence: peak GiB compares like with like only where the
    # batch is the same for every variant at a length.
    batch = {str(n): "/".join(str(b) for b in sorted({r["batch"] for r in rows
                                                      if r["tokens"] == n})) for n in lengths}
    return {"lengths": lengths, "longest": longest, "previous": previous,
            "tokens_per_step": tokens_per_step, "batch": batch, "best_full": best_full,
            "table": lines}


def prefill_reading(summary: dict[str, Any]) -> str:
    """Facts from the table in words; every figure is read off ``summary``."""
    lengths, longest, previous = summary["lengths"], summary["longest"], summary["previous"]
    n0, nl = str(lengths[0]), str(longest)
    k0, kl = klabel(lengths[0]), klabel(longest)
    table = {e["label"]: e for e in summary["table"]}
    s1k = {k: e["s_per_1k_tokens"] for k, e in table.items()}
    ratio = {k: e["longest_over_previous"] for k, e in table.items()
             if e["longest_over_previous"] is not None}
    flat = [k for k, r in ratio.items() if r <= FLAT]
    rising = sorted((r, k) for k, r in ratio.items() if r > FLAT)
    sentences = []
    if ratio:
        said = []
        if flat:
            said.append(f"{join_words(flat)} are flat ({span(ratio[k] for k in flat)})")
        if rising:
            said.append("cost rises " + ", ".join(f"{times(r)} for {k}" for r, k in rising))
        sentences.append(f"From {klabel(previous)} to {kl}, per-token cost: "
                         + "; ".join(said) + ".")
    fulls = [e for e in summary["table"]
             if e["variant"] == "full" and {n0, nl} <= set(e["s_per_1k_tokens"])]
    if fulls:
        growth = [f"{times(e['s_per_1k_tokens'][nl] / e['s_per_1k_tokens'][n0])} with "
                  f"{SDPA_NAMES.get(e['sdpa']) or e['sdpa']}" for e in fulls]
        sentences.append(f"Full attention's s/1K grows {join_words(growth)} from {k0} to {kl}.")
    e2e = s1k.get("e2e")
    if e2e and n0 in e2e and nl in e2e:
        if "swa" in s1k:
            text = (f"e2e costs {times(e2e[n0] / s1k['swa'][n0])} swa's s/1K at {k0} and "
                    f"{times(e2e[nl] / s1k['swa'][nl])} at {kl}")
            recurrent = [v for v in RECURRENT if v in s1k and nl in s1k[v]]
            if recurrent:
                text += (f", and {span(e2e[nl] / s1k[v][nl] for v in recurrent)} that of the "
                         f"recurrent hybrids ({join_words(recurrent)}) at {kl}")
            sentences.append(text + ".")
        best = summary["best_full"]
        vs = [(n, best[n]["s_per_1k_tokens"] / e2e[n]) for n in (n0, nl) if n in best]
        if vs:
            said = [f"{times(v)} at {klabel(int(n))} ({'faster' if v > 1 else 'slower'})"
                    for n, v in vs]
            sentences.append(f"Against the best full at each length, e2e's speed is "
                             f"{join_words(said)}.")
        peaks, batch = table["e2e"]["peak_gib"], summary["batch"]
        others = [e["peak_gib"][n0] for k, e in table.items() if k != "e2e" and n0 in e["peak_gib"]]
        if n0 in peaks and others:
            text = (f"e2e's peak memory at {k0} (batch {batch[n0]}) is {peaks[n0]:.1f} GiB, "
                    f"against {span(others, lambda x: f'{x:.1f}')} GiB for the others")
            if nl in peaks:
                text += f"; at {kl} (batch {batch[nl]}) it is {peaks[nl]:.1f} GiB"
            sentences.append(text + ".")
    return " ".join(sentences)


def prefill(paths: list[Path], out: Path) -> None:
    inputs: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for path in paths:
        data = load(path)
        names = list(dict.fromkeys(r["variant"] for r in data["rows"]))
        if len(names) != 1:
            sys.exit(f"{path.name}: expected the rows of one variant, found {names}")
        if names[0] in inputs:
            sys.exit(f"{path.name}: variant {names[0]} is already in "
                     f"{inputs[names[0]]['source']}")
        inputs[names[0]] = {"source": path.name, "title": data["title"], "env": data["env"],
                            "notes": data.get("notes", [])}
        rows += data["rows"]
    variants = list(inputs)
    summary = prefill_summary(rows, variants)
    presets = sorted({r["preset"] for r in rows})
    envs = {v: inputs[v]["env"] for v in variants}
    shared, env_lines = env_section(envs)
    devices = sorted({short_device(e.get("device", "?")) for e in envs.values()})
    step = "/".join(str(n) for n in summary["tokens_per_step"])
    title = (f"Prefill of the {count_word(len(variants))} variants, {', '.join(presets)}, "
             f"{step} tokens per step ({', '.join(devices)})")
    lengths, longest, previous = summary["lengths"], summary["longest"], summary["previous"]
    e2e_longest = next((e["s_per_1k_tokens"].get(str(longest)) for e in summary["table"]
                        if e["label"] == "e2e"), None)
    first_env = next(iter(envs.values()))
    notes = [PREFILL_RUNS.format(torch=first_env.get("torch"), triton=first_env.get("triton"))]
    if e2e_longest is not None:
        notes.append(PREFILL_RECOMPILE.format(e2e_longest=sig(e2e_longest)))
    reading = prefill_reading(summary)

    best = summary["best_full"][str(longest)]
    ks = [klabel(n) for n in lengths]
    md = [f"# {title}", ""]
    md += env_lines
    md += ["", f"Seconds per 1K tokens (s/1K, median of the timed repeats) at each context "
               f"length, with the batch chosen so every step holds {step} tokens; peak GiB is "
               "`torch.cuda.max_memory_allocated` at each length. \"vs best full at "
               f"{klabel(longest)}\" is the best full s/1K at {klabel(longest)} "
               f"({label('full', best['sdpa'])}, {sig(best['s_per_1k_tokens'])}) divided by the "
               f"row's (>1: faster than full); \"{klabel(longest)} / {klabel(previous)}\" is the "
               "row's own cost ratio between those lengths (1: flat).", ""]
    head = ([f"s/1K {k}" for k in ks] + [f"peak GiB {' / '.join(ks)}",
                                         f"vs best full at {klabel(longest)}",
                                         f"{klabel(longest)} / {klabel(previous)}"])
    md += ["| variant | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for e in summary["table"]:
        s1k = [sig(e["s_per_1k_tokens"][str(n)]) if str(n) in e["s_per_1k_tokens"] else "-"
               for n in lengths]
        peak = " / ".join(f"{e['peak_gib'][str(n)]:.1f}" if str(n) in e["peak_gib"] else "-"
                          for n in lengths)
        vs, flat = e["vs_best_full_longest"], e["longest_over_previous"]
        cells = [*s1k, peak, times(vs) if vs is not None else "-",
                 times(flat) if flat is not None else "-"]
        md.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    md += ["", "Commands (one process per variant; `$OUT` is the run's output folder):", ""]
    md += [f"- {v}: `{inputs[v]['env'].get('command', '?')}`" for v in variants]
    input_notes = [(v, n) for v in variants for n in inputs[v]["notes"]]
    if input_notes:
        md += ["", "Notes from the inputs:", ""] + [f"- {v}: {n}" for v, n in input_notes]
    md += ["", "## Reading", "", reading, "", "## Runs", ""]
    md += [f"{n}\n" for n in notes]

    report = {"title": title, "env": shared, "inputs": inputs, "rows": rows,
              "summary": {**summary, "reading": reading}, "notes": notes}
    write_outputs(out, report, "\n".join(md).rstrip("\n") + "\n")


# ------------------------------------------------------------------------------ decode
def decode_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    contexts = sorted({r["context"] for r in rows})
    if len(contexts) < 2:
        sys.exit(f"decode: the report compares context lengths; the input holds only {contexts}")
    short, longest = contexts[0], contexts[-1]
    modes = sorted({r["mode"] for r in rows})
    presets = sorted({r["preset"] for r in rows})
    if len(modes) != 1 or len(presets) != 1:
        # One table row per variant only makes sense for one preset and one mode.
        sys.exit(f"decode: expected one preset and one mode, found {presets} and {modes}")
    table = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        by_ctx = {r["context"]: r for r in rows if r["variant"] == variant}
        pick = [n for n in (short, longest) if n in by_ctx]
        entry: dict[str, Any] = {
            "variant": variant,
            "per_token_ms": {str(n): by_ctx[n]["per_token_ms"] for n in pick},
            "state_mib": {str(n): by_ctx[n]["state_mib"] for n in pick},
            "inner_step_ms": {str(n): by_ctx[n]["inner_step_ms"] for n in pick},
            "longest_over_shortest": None}
        if len(pick) == 2:
            entry["longest_over_shortest"] = (by_ctx[longest]["per_token_ms"]
                                              / by_ctx[short]["per_token_ms"])
        table.append(entry)
    return {"preset": presets[0], "mode": modes[0], "contexts": contexts, "shortest": short,
            "longest": longest, "table": table,
            "inner_step_variants": [e["variant"] for e in table
                                    if any(v > 0 for v in e["inner_step_ms"].values())]}


def decode_reading(summary: dict[str, Any]) -> str:
    short, longest = str(summary["shortest"]), str(summary["longest"])
    ks, kl = klabel(summary["shortest"]), klabel(summary["longest"])
    table = {e["variant"]: e for e in summary["table"]}
    ratio = {v: e["longest_over_shortest"] for v, e in table.items()
             if e["longest_over_shortest"] is not None}
    flat = [v for v, r in ratio.items() if r <= FLAT]
    text = ""
    if flat:
        text += (f"{join_words(flat)} are flat: ms/token at {kl} is {span(ratio[v] for v in flat)}"
                 f" that at {ks}, at {span((table[v]['per_token_ms'][short] for v in flat), _ms)}"
                 " ms.")
    for variant, why in (("full", "as its key/value cache grows"),
                         ("hybrid", "from its full-attention blocks, whose caches take its state")):
        e = table.get(variant)
        if e is None or ratio.get(variant) is None or ratio[variant] <= FLAT:
            continue
        state = e["state_mib"]
        text += (f" {variant} grows {times(ratio[variant])} "
                 f"({_ms(e['per_token_ms'][short])} → {_ms(e['per_token_ms'][longest])} ms) "
                 f"{why} from {_gib(state[short])} GiB at {ks} to {_gib(state[longest])} GiB "
                 f"at {kl}.")
    if "e2e" in table:
        e2e = table["e2e"]["state_mib"]
        fixed = [v for v in flat if v != "e2e" and
                 table[v]["state_mib"][short] == table[v]["state_mib"][longest]]
        text += f" e2e's state is {e2e[longest]:.0f} MiB at both lengths"
        if fixed:
            text += (f", against {span((table[v]['state_mib'][longest] for v in fixed), _mib)}"
                     f" MiB for {join_words(fixed)}")
        if "full" in table:
            text += (f", and {e2e[longest] / table['full']['state_mib'][longest]:.2f}x of full's "
                     f"cache at {kl}")
        text += "."
    return text.strip()


def _ms(x: float) -> str:
    return f"{x:.2f}"


def _mib(x: float) -> str:
    return f"{x:.0f}"


def _gib(mib: float) -> str:
    return f"{mib / 1024:.1f}"


def decode(path: Path, out: Path) -> None:
    data = load(path)
    summary = decode_summary(data["rows"])
    env = data["env"]
    variants = [e["variant"] for e in summary["table"]]
    title = (f"Decode latency of the {count_word(len(variants))} variants, {summary['preset']}, "
             f"{'CUDA graphs' if summary['mode'] == 'graph' else summary['mode']} "
             f"({short_device(env.get('device', '?'))})")
    short, longest = str(summary["shortest"]), str(summary["longest"])
    ks, kl = klabel(summary["shortest"]), klabel(summary["longest"])
    reading = decode_reading(summary)

    md = [f"# {title}", "", f"{data['title']}.", ""]
    md += [f"- {k}: `{env.get(k)}`" for k in ENV_KEYS]
    md += ["", f"Command: `{env.get('command', '?')}` (`$OUT` is the run's output folder)", "",
           "ms/token is the median decode step plus the per-chunk inner step divided by the "
           "chunk size; state MiB is the bytes held by the decoding state's tensors (derived "
           "copies included), not the model's weights.", ""]
    head = [f"ms/token {ks}", f"ms/token {kl}", f"{kl} / {ks}", f"state MiB {ks}",
            f"state MiB {kl}"]
    md += ["| variant | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for e in summary["table"]:
        pt, st, r = e["per_token_ms"], e["state_mib"], e["longest_over_shortest"]
        cells = [_ms(pt[short]) if short in pt else "-", _ms(pt[longest]) if longest in pt else "-",
                 times(r) if r is not None else "-", _mib(st[short]) if short in st else "-",
                 _mib(st[longest]) if longest in st else "-"]
        md.append(f"| {e['variant']} | " + " | ".join(cells) + " |")
    inner = summary["inner_step_variants"]
    if inner:
        # Why only e2e: the bench times Engine.finish_chunk separately only where the per-chunk
        # update is outside the per-token step; ttt_kvb's runs inside its step.
        said = "; ".join(
            f"{v}'s inner step takes " + " and ".join(
                f"{_ms(ms)} ms at {klabel(int(n))}"
                for n, ms in next(e for e in summary["table"]
                                  if e["variant"] == v)["inner_step_ms"].items())
            for v in inner)
        md += ["", f"inner_step_ms (the per-chunk TTT update, amortised into ms/token) is "
                   f"reported for {join_words(inner)} only: the bench times `finish_chunk` only "
                   "for e2e; ttt_kvb's per-chunk update is inside its per-token step time. "
                   f"{said}."]
    for n in data.get("notes", []):
        md += ["", n]
    md += ["", "## Reading", "", reading]

    # The input's content stays as it was (same keys, same rows); only the summary is added.
    report = {**{k: v for k, v in data.items() if k != "summary"},
              "summary": {**summary, "reading": reading}}
    write_outputs(out, report, "\n".join(md) + "\n")


# ------------------------------------------------------------------------------ small
def _loss(x: float) -> str:
    return f"{x:.4f}"


def _diff(x: float) -> str:
    return f"{x:+.4f}"


def buckets(row: dict[str, Any]) -> list[tuple[int, int]]:
    """The row's window-sized position buckets, (a, b) for each ``loss_a_b``, in order."""
    out = []
    for key in row:
        parts = key.split("_")
        if len(parts) == 3 and parts[0] == "loss" and all(p.isdigit() for p in parts[1:]):
            out.append((int(parts[1]), int(parts[2])))
    return sorted(out)


def small_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["variant"]: r for r in rows}
    summary: dict[str, Any] = {
        # beyond - within: negative where loss falls after the first window
        "beyond_minus_within": {v: round(r["beyond_window"] - r["within_window"], 4)
                                for v, r in by.items()},
        "by_eval_loss": sorted(by, key=lambda v: by[v]["eval_loss"]),
        "beyond_vs_full": None, "within_e2e_minus_full": None}
    if "full" in by:
        full = by["full"]["beyond_window"]
        summary["beyond_vs_full"] = {v: round(r["beyond_window"] - full, 4)
                                     for v, r in by.items() if v != "full"}
        if "e2e" in by:
            summary["within_e2e_minus_full"] = round(
                by["e2e"]["within_window"] - by["full"]["within_window"], 4)
    return summary


def small_reading(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Facts from the table in words; every figure is read off ``rows`` and ``summary``."""
    by = {r["variant"]: r for r in rows}
    drop = summary["beyond_minus_within"]
    largest = min(drop, key=drop.get)
    sentences = [
        "From the first window to the mean of the later windows (beyond minus first window), "
        "loss changes by " + join_words([f"{_diff(d)} for {v}" for v, d in drop.items()])
        + (f"; the largest drop is {largest}'s." if drop[largest] < 0 else "."),
        "By eval loss, lowest first: "
        + ", ".join(f"{v} ({_loss(by[v]['eval_loss'])})" for v in summary["by_eval_loss"])
        + "."]
    vs = summary["beyond_vs_full"]
    if vs:
        order = sorted(vs, key=vs.get)
        sentences.append(
            f"Beyond the window, against full's {_loss(by['full']['beyond_window'])}: "
            + ", ".join(f"{v} {_diff(vs[v])}" for v in order) + " (negative: below full).")
    early = summary["within_e2e_minus_full"]
    if early is not None and early < -EARLY_GAP:
        sentences.append(
            "e2e is already lower inside the first window (before most of its updates), so at "
            "this scale and step count the gap mostly reflects faster early training, not memory "
            "beyond the window; the drop across positions is the quantity that speaks to long "
            "context.")
    return " ".join(sentences)


def small(paths: list[Path], out: Path, missing_note: str | None) -> None:
    rows: list[dict[str, Any]] = []
    inputs: dict[str, dict[str, Any]] = {}
    commands: dict[str, str] = {}
    first: tuple[str, dict[str, Any]] | None = None
    for path in paths:
        data = load(path)
        if "settings" not in data:
            sys.exit(f"{path.name}: no settings; is it a benchmarks/variants_small.py report?")
        if len(data["rows"]) != 1:
            sys.exit(f"{path.name}: expected one row (one variant), found {len(data['rows'])}")
        row, env = data["rows"][0], data["env"]
        if row["variant"] in inputs:
            sys.exit(f"{path.name}: variant {row['variant']} is already in "
                     f"{inputs[row['variant']]['source']}")
        if first is None:
            first = (path.name, data)
        else:
            name, ref = first
            if data["settings"] != ref["settings"]:
                keys = sorted(k for k in {*data["settings"], *ref["settings"]}
                              if data["settings"].get(k) != ref["settings"].get(k))
                sys.exit(f"small: {path.name} and {name} differ in settings {keys}; the "
                         "comparison needs the same data, steps and seed for every variant")
            keys = [k for k in SMALL_ENV_KEYS if env.get(k) != ref["env"].get(k)]
            if keys:
                sys.exit(f"small: {path.name} and {name} differ in env {keys}; the comparison "
                         "needs one machine and one torch for every variant")
        inputs[row["variant"]] = {"source": path.name, "wall_s": env.get("wall_s")}
        commands[row["variant"]] = env.get("command", "?")
        rows.append(row)
    assert first is not None  # argparse's nargs="+" gives at least one path
    ref = first[1]
    settings, env = ref["settings"], {k: ref["env"].get(k) for k in SMALL_ENV_KEYS}
    variants = list(inputs)
    missing = [v for v in SMALL_VARIANTS if v not in inputs]
    device = short_device(str(env["machine"]).split(", ")[-1])
    title = f"All variants, small-scale, same tokens ({device})"
    summary = small_summary(rows)
    reading = small_reading(rows, summary)
    W, seq = settings["window"], settings["seq_len"]
    params = sorted(r["params"] for r in rows)[len(rows) // 2]  # median (upper of two)
    scale = (f"Small-scale (about {params / 1e6:.0f}M parameters, {settings['steps']} steps): a "
             "check that the systems train and evaluate in one harness, far from the paper's "
             "scale; the CPU report variants_small_cpu.md has all "
             f"{count_word(len(SMALL_VARIANTS))} at a smaller size.")

    spans = buckets(rows[0])
    head = ["params", "train loss", "eval loss", "first window", "beyond the window",
            *(f"{a}-{b}" for a, b in spans), "train s"]
    md = [f"# {title}", "", f"Environment, identical for all {count_word(len(rows))} inputs:",
          ""]
    md += [f"- {k}: `{env[k]}`" for k in SMALL_ENV_KEYS]
    md += ["", "Settings, identical for all inputs: "
           + ", ".join(f"{k} `{v}`" for k, v in settings.items()) + ".", ""]
    md += ["| variant | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for r in rows:
        cells = [f"{r['params']:,}", _loss(r["train_loss"]), _loss(r["eval_loss"]),
                 _loss(r["within_window"]), _loss(r["beyond_window"]),
                 *(_loss(r[f"loss_{a}_{b}"]) if f"loss_{a}_{b}" in r else "-" for a, b in spans),
                 f"{r['train_s']:.1f}"]
        md.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    md += ["", f"{env['train_tokens_per_variant']:,} training tokens per variant "
               f"({settings['steps']} steps of {settings['batch']} x {seq}). Each variant was "
               "trained and evaluated in its own process, on the same "
               f"{settings['eval_sequences']} held-out windows of {seq} tokens; \"first window\" "
               f"is the mean loss at positions 0-{W - 1}, \"beyond the window\" the mean at "
               f"{W}-{seq - 1}, and each numbered column one window of {W} positions.", "",
           "Commands (one process per variant; `$WORK` and `$OUT` are the run's scratch and "
           "output folders):", ""]
    md += [f"- {v}: `{commands[v]}`" for v in variants]
    if missing:
        why = f" — {missing_note.rstrip('.')}" if missing_note else ""
        md += ["", f"Not in this run: {join_words(missing)}{why}."]
    md += ["", "## Reading", "", reading, "", scale]

    report = {"title": title, "env": env, "settings": settings, "rows": rows,
              "commands": commands, "inputs": inputs, "missing": missing,
              "missing_reason": missing_note,
              "summary": {**summary, "reading": reading, "scale": scale}}
    write_outputs(out, report, "\n".join(md) + "\n")


# ------------------------------------------------------------------------------ cli
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("prefill", help="one `tttlm bench prefill` JSON per variant")
    p.add_argument("inputs", nargs="+", type=Path, help="per-variant JSONs, in table order")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    d = sub.add_parser("decode", help="one `tttlm bench decode` JSON")
    d.add_argument("input", type=Path)
    d.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    m = sub.add_parser("small", help="one benchmarks/variants_small.py JSON per variant")
    m.add_argument("inputs", nargs="+", type=Path, help="per-variant JSONs, in table order")
    m.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    m.add_argument("--missing-note", metavar="TEXT",
                   help="why the variants without an input are missing")
    args = parser.parse_args(argv)
    if args.kind == "prefill":
        prefill(args.inputs, args.out)
    elif args.kind == "small":
        small(args.inputs, args.out, args.missing_note)
    else:
        decode(args.input, args.out)


if __name__ == "__main__":
    main()
