"""``DIR/report.html``: the one page to open after a sweep, self-contained (styles and plots inline,
no script, nothing fetched), so it opens from disk in any browser with no server and can be mailed or
logged as an MLflow artifact as one file. Links to adapters and logs are relative to the sweep
directory. ``summary.md`` stays for terminals and diffs.

Sections: the table with the quality rule, the plots, the generations side by side (one column per
trial, the base model first), and each trial's settings with links to its adapter, files and log.
"""

from __future__ import annotations

import base64
import time
from html import escape
from pathlib import Path

from sweep import sweepdir
from sweep.summary import (TABLE_HEAD, compared_on, config_rows, load_generations, quality_rule, table_cells,
                           truncation_warnings)
from trainers.config import ADAPTER_DIR, GENERATIONS_MD, METRICS_FILE
from trainers.entry import log_path

REPORT = "report.html"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } .scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; } th, td { border: 1px solid #ccc; padding: 3px 7px; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best { background: #fff6cc; } tr.bad td { color: #a00; }
figure { display: inline-block; margin: 0 1em 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
.gens { display: grid; grid-auto-flow: column; grid-auto-columns: minmax(260px, 1fr); gap: .8em; overflow-x: auto; }
.gen { border: 1px solid #ddd; border-radius: 4px; padding: .5em; background: #fafafa; white-space: pre-wrap; }
.gen b { display: block; margin-bottom: .3em; } .ref { background: #eef6ee; } .noend { color: #a60; font-size: 12px; }
details { margin: .4em 0; } summary { cursor: pointer; } code { background: #f3f3f3; padding: 0 3px; }
"""
NUMERIC = {"params updated (M)", "eval loss ± SE", "response loss ± SE", "vs base", "perplexity", "ROUGE-L ± SE",
           "repeat 3-grams", "end marker", "truncated rows", "response lost", "train time (s)", "tokens/s",
           "peak GPU GiB", "r", "base bits"}


def _table(rows: list[dict], metric: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in TABLE_HEAD)
    body = []
    for r in config_rows(rows):
        cls = "best" if r["best"] else "bad" if r["status"] != sweepdir.TERMINATED else ""
        cells = "".join(f'<td class="num">{escape(c)}</td>' if h in NUMERIC else f"<td>{escape(c)}</td>"
                        for h, c in zip(TABLE_HEAD, table_cells(r)))
        body.append(f'<tr class="{cls}">{cells}</tr>')
    errors = "".join(f"<li><b>{escape(r['trial_id'])}</b>: {escape(r['error'])}</li>" for r in rows
                     if r["status"] != sweepdir.TERMINATED and r["error"])
    warnings = "".join(f"<li>{escape(w)}</li>" for w in truncation_warnings(rows))
    return (f'<div class="scroll"><table id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            f'</table></div><p>{escape(quality_rule(metric, rows))}</p>'
            + (f"<p>Errors:</p><ul>{errors}</ul>" if errors else "")
            + (f"<p>Warnings:</p><ul>{warnings}</ul>" if warnings else ""))


def _plots(plots: dict[str, Path]) -> str:
    figures = []
    for name, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        title = name.replace("_", " ")
        figures.append(f'<figure><img class="plot" alt="{escape(title)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{escape(title)} (<code>plots/{escape(path.name)}</code>)</figcaption></figure>")
    return "".join(figures) or "<p>No plots: no trial finished.</p>"


def _generations(out: Path, rows: list[dict], end_marker: str) -> str:
    gens = load_generations(out, rows)
    order = [r for r in rows if r["trial_id"] in gens]
    if not any(gens[r["trial_id"]] for r in order):
        return "<p>No trial produced generations.</p>"
    parts = []
    for i, item in enumerate(gens[order[0]["trial_id"]]):
        held = " [held-out]" if item["source"] == "test" else ""
        cards = []
        if item.get("reference"):
            cards.append(f'<div class="gen ref"><b>reference</b>{escape(item["reference"])}</div>')
        for r in [r for r in order if i < len(gens[r["trial_id"]])]:
            g = gens[r["trial_id"]][i]
            who = "base model" if r["baseline"] else \
                f"r={r['r']}, {r['targets']}, {r['bits']}-bit, loss on {r['loss_on']}"
            missing = "end marker" if end_marker else "end"
            end = "" if g["ended"] else f'<span class="noend"> (no {missing})</span>'
            cards.append(f'<div class="gen"><b>{escape(r["trial_id"])} ({escape(who)}){end}</b>'
                         f'{escape(g["generation"]) or "(empty)"}</div>')
        parts.append(f"<h3>{escape(item['title'])}{held}</h3>"
                     f'<div class="gens">{"".join(cards)}</div>')
    return "".join(parts)


def _trials(out: Path, planned, rows: list[dict]) -> str:
    by_name = {r["trial_id"]: r for r in rows}
    parts = []
    for p in planned:
        name, r = p.cfg.name, by_name.get(p.cfg.name, {})
        files = [(ADAPTER_DIR + "/", out / sweepdir.TRIALS_DIR / name / ADAPTER_DIR),
                 (GENERATIONS_MD, out / sweepdir.TRIALS_DIR / name / GENERATIONS_MD),
                 (METRICS_FILE, out / sweepdir.TRIALS_DIR / name / METRICS_FILE),
                 ("log", log_path(out / sweepdir.LOGS_DIR, name))]
        links = " · ".join(f'<a href="{escape(path.relative_to(out).as_posix())}">{escape(label)}</a>'
                           for label, path in files if path.exists()) or "no files"
        settings = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>"
                           for k, v in p.cfg.to_dict().items())
        status = escape(r.get("status", sweepdir.NOT_RUN)) + (f": {escape(r['error'])}" if r.get("error") else "")
        parts.append(f"<details><summary><b>{escape(name)}</b> ({status}) {links}</summary>"
                     f"<table>{settings}</table></details>")
    return "".join(parts)


def render(out: Path, manifest: dict, planned, rows: list[dict], plots: dict[str, Path], metric: str) -> str:
    first = planned[0].cfg
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    meta = (f"sweep id <code>{escape(manifest['sweep_id'])}</code> · space <code>{escape(str(manifest['space']))}"
            f"</code> · started {escape(manifest.get('created', '-'))} · model <code>{escape(first.model)}</code> · "
            f"dataset <code>{escape(first.dataset)}</code> ({escape(first.data_format)}) · best by "
            f"{escape(compared_on(rows, metric))} · "
            + ", ".join(f"{n} {escape(s)}" for s, n in counts.items()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sweep {escape(manifest['name'])}</title><style>{STYLE}</style></head>
<body>
<h1>Sweep {escape(manifest['name'])}</h1>
<p class="meta">{meta}</p>
<h2 id="table">The table</h2>
{_table(rows, metric)}
<h2 id="plots">Plots</h2>
{_plots(plots)}
<h2 id="generations">Generations, side by side</h2>
<p>Greedy decoding, max_new_tokens={first.max_new_tokens}, stopping at {f"<code>{escape(first.marker)}</code>"
                                                                        if first.marker else "EOS"}.</p>
{_generations(out, rows, first.marker)}
<h2 id="trials">Trials: settings, adapter, files, log</h2>
{_trials(out, planned, rows)}
<p class="meta">Written {escape(time.strftime('%Y-%m-%d %H:%M:%S'))}.
The same table is in summary.md and summary.csv.</p>
</body></html>
"""


def write_report(out: Path, manifest: dict, planned, rows: list[dict], plots: dict[str, Path], *, metric: str) -> Path:
    path = out / REPORT
    path.write_text(render(out, manifest, planned, rows, plots, metric), encoding="utf-8")
    return path
