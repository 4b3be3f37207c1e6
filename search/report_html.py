"""The early-stopped trial report as one self-contained HTML page.

The page opens offline: inline CSS, no scripts, pictures embedded as base64 `data:` URIs. Every
string that came from a user or a trial (job name, parameters, error messages) is escaped.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search.plots import PLOTS, render_pngs
from search.report import step_in_words
from search.spec import CORE_PARAMS

# Stopped trials the page's table lists at most (those that reached the best values).
STOPPED_ROWS = 100

# Picture size in the page, in pixels; CSS scales it down to the page width.
PLOT_WIDTH_PX = 1000
PLOT_HEIGHT_PX = 600

_PLOT_CAPTIONS = {
    "learning_curves": "Monitored metric per epoch of every trial, coloured by how it ended; "
                       "the best trial is the thick line.",
    "history": "Each finished trial's value in the order trials ran, with the best so far.",
    "importances": "How much each searched hyperparameter mattered for the metric.",
    "lr_vs_batch": "Where trials sampled learning rate and batch size, coloured by value; "
                   "crosses mark pruned trials.",
}

# Why the best trial ended, in words (it completed, so only these two occur).
_BEST_STOPS = {"max_epochs": "ran to max_epochs", "early_stopped": "early-stopped (patience)"}

_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dfe3ea; --bg: #f6f7f9; --accent: #0072b2; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 20px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; word-break: break-word; }
header p { margin: 0; color: var(--muted); }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 16px 20px; margin-top: 18px; }
h2 { font-size: 18px; margin: 0 0 12px; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 13px;
  font-weight: 600; background: #e8ebf0; color: var(--fg); }
.badge.succeeded { background: #d9f2e6; color: #0b6b3a; }
.badge.running, .badge.queued { background: #dcebf7; color: #0b4f80; }
.badge.failed { background: #fbe0dc; color: #8f1d0e; }
.badge.cancelled { background: #eeeeee; color: #555; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr));
  gap: 10px; margin: 0; }
.cards div { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; }
.cards dt { color: var(--muted); font-size: 13px; }
.cards dd { margin: 0; font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
table.kv { width: auto; min-width: 360px; }
.scroll { overflow-x: auto; }
.note { color: var(--muted); font-size: 13px; margin: 8px 0 0; }
figure { margin: 0 0 18px; }
figure img { display: block; width: 100%; height: auto; border: 1px solid var(--line);
  border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.state-PRUNED { color: #a35f00; } .state-FAIL { color: #8f1d0e; }
footer { color: var(--muted); font-size: 12px; margin-top: 18px; text-align: center; }
@media print { body { background: #fff; } section { break-inside: avoid; } }
"""


def render_html(report: dict[str, Any], study: optuna.Study, *,
                trials: Sequence[FrozenTrial] | None = None) -> str:
    """The report of `search.report.build_report` with the study's plots, as one HTML page;
    `trials` are the study's when the caller has read them already (as for the report).

    Bounded however many trials the job has: the pictures draw at most a few hundred curves
    and a few thousand points (search.plot_trials), the stopped trials' table lists the
    STOPPED_ROWS that reached the best values (the JSON report and the CSV hold every one).
    """
    job = report.get("job") or {}
    spec = report.get("spec") or {}
    name = job.get("name") or spec.get("name") or "job"
    job_id = job.get("id")
    title = f"hptune report: {name}" + (f" (job {job_id})" if job_id is not None else "")
    pngs = render_pngs(study, PLOTS, PLOT_WIDTH_PX, PLOT_HEIGHT_PX, trials=trials)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    resource = (spec.get("pruner") or {}).get("resource", "epochs")
    body = "\n".join([
        _header(name, job, spec),
        _summary(report, job, spec),
        _best(report.get("best_trial"), spec),
        _saved(report.get("compute_saved") or {}, spec),
        _audit(report.get("pruning_audit"), resource),
        _plots(pngs),
        _stopped(report.get("stopped_trials") or [], spec, maximize),
        f"<footer>Generated by hptune on {_e(_now())}.</footer>",
    ])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


# --- sections ----------------------------------------------------------------------------------


def _header(name: str, job: dict[str, Any], spec: dict[str, Any]) -> str:
    status = str(job.get("status") or "unknown")
    bits = []
    if job.get("id") is not None:
        bits.append(f"job {_e(job['id'])}")
    bits.append(f'<span class="badge {_e(status)}">{_e(status)}</span>')
    if job.get("owner"):
        bits.append(f"owner {_e(job['owner'])}")
    if spec.get("dataset") is not None:
        bits.append(f"dataset {_e(spec['dataset'])}")
    sampler = (spec.get("sampler") or {}).get("name")
    pruner = (spec.get("pruner") or {}).get("name")
    if sampler:
        bits.append(f"sampler {_e(sampler)}")
    if pruner:
        bits.append(f"pruner {_e(pruner)}")
    error = f'<p class="note">error: {_e(job["error"])}</p>' if job.get("error") else ""
    return (f"<header>\n<h1>{_e(name)}</h1>\n<p>{' &middot; '.join(bits)}</p>\n{error}"
            "</header>")


def _summary(report: dict[str, Any], job: dict[str, Any], spec: dict[str, Any]) -> str:
    c = report.get("counts") or {}
    finished = int(c.get("complete", 0)) + int(c.get("pruned", 0))
    n_trials = job.get("n_trials", spec.get("n_trials"))
    cards = [
        ("finished trials", f"{finished}" + (f" / {n_trials}" if n_trials is not None else "")),
        ("complete", c.get("complete", 0)),
        ("pruned", c.get("pruned", 0)),
        ("failed", c.get("failed", 0)),
    ]
    if c.get("running"):
        cards.append(("running", c["running"]))
    if c.get("waiting"):
        cards.append(("waiting", c["waiting"]))
    cards += [
        ("wall time", _duration(report.get("wall_seconds"))),
        ("epochs trained", report.get("total_epochs", 0)),
        ("max epochs per trial", spec.get("max_epochs", "-")),
        ("metric", spec.get("metric", "-")),
    ]
    dl = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in cards)
    return f'<section id="summary">\n<h2>Summary</h2>\n<dl class="cards">{dl}</dl>\n</section>'


def _best(best: dict[str, Any] | None, spec: dict[str, Any]) -> str:
    if not best:
        return ('<section id="best">\n<h2>Best trial</h2>\n'
                "<p>No trial has completed yet.</p>\n</section>")
    rows = [(f"<strong>{_e(best.get('metric', 'value'))}</strong>",
             f"<strong>{_e(_fmt(best.get('value')))}</strong>")]
    for k, v in sorted(best.get("params", {}).items(), key=lambda kv: _param_order(kv[0])):
        rows.append((_e(k), _e(_fmt(v))))
    for k, v in _fixed(spec).items():
        rows.append((f"{_e(k)} <span class=\"note\">(fixed)</span>", _e(_fmt(v))))
    rows.append(("best epoch / stopped epoch",
                 f"{_e(_fmt(best.get('best_epoch')))} / {_e(_fmt(best.get('stopped_epoch')))}"))
    reason = best.get("stop_reason")
    rows.append(("stopped because", _e(_BEST_STOPS.get(reason, reason or "-"))))
    for k, v in (best.get("test_metrics") or {}).items():
        rows.append((f"test {_e(k)}", _e(_fmt(v))))
    trs = "".join(f'<tr><th scope="row">{k}</th><td class="num">{v}</td></tr>' for k, v in rows)
    return (f'<section id="best">\n<h2>Best trial #{_e(best.get("number"))}</h2>\n'
            f'<table class="kv"><tbody>{trs}</tbody></table>\n</section>')


def _saved(s: dict[str, Any], spec: dict[str, Any]) -> str:
    rows = []
    total_epochs = 0
    total_seconds = 0.0
    for kind, label in (("pruned", "pruning (incl. diverged)"),
                        ("early_stopped", "early stopping")):
        epochs = s.get(f"{kind}_epochs") or 0
        seconds = float(s.get(f"{kind}_seconds") or 0.0)
        total_epochs += epochs
        total_seconds += seconds
        rows.append((_e(label), epochs, _pct(s.get(f"{kind}_epochs_share")), _duration(seconds),
                     _pct(s.get(f"{kind}_seconds_share"))))
    budget_e = s.get("full_budget_epochs") or 0
    budget_s = s.get("full_budget_seconds") or 0.0
    rows.append(("<strong>together</strong>", round(total_epochs, 2),
                 _pct(total_epochs / budget_e if budget_e else 0.0), _duration(total_seconds),
                 _pct(total_seconds / budget_s if budget_s else 0.0)))
    head = ("<tr><th>saved by</th><th class=\"num\">epochs</th><th class=\"num\">share</th>"
            "<th class=\"num\">time</th><th class=\"num\">share</th></tr>")
    trs = "".join(
        f"<tr><td>{label}</td>"
        + "".join(f'<td class="num">{_e(v)}</td>' for v in vals) + "</tr>"
        for label, *vals in rows)
    note = (f"Shares are of the budget of running every finished trial to max_epochs "
            f"({spec.get('max_epochs', '?')}): {budget_e} epochs, about "
            f"{_duration(budget_s)}.")
    return (f'<section id="saved">\n<h2>Compute saved</h2>\n<table><thead>{head}</thead>'
            f'<tbody>{trs}</tbody></table>\n<p class="note">{_e(note)}</p>\n</section>')


def _audit(a: dict[str, Any] | None, resource: str) -> str:
    if not a:
        return ""
    verdict = (f"{a['false_prunes']} of {a['n_audited']} audited trials would have beaten the "
               f"best trial the pruner kept" + (f" (at rungs/epochs {a['false_prune_rungs']})"
                                                if a["false_prunes"] else "")
               + f"; {a['beat_median_kept']} would have beaten the median kept trial. "
               f"Regret: {_fmt(a['regret'])}. The audit cost {a['audit_epochs']} extra epochs.")
    head = ("<tr><th>#</th><th>pruned at</th><th class=\"num\">value then</th>"
            "<th class=\"num\">cut-off</th><th class=\"num\">final value</th>"
            "<th class=\"num\">kept trials beaten</th><th>false prune</th></tr>")
    trs = "".join(
        f"<tr><td>{_e(i['number'])}</td><td>{_e(_pruned_at(i, resource))}</td>"
        f"<td class=\"num\">{_fmt(i['value_at_prune'])}</td>"
        f"<td class=\"num\">{_fmt(i['cutoff'])}</td>"
        f"<td class=\"num\">{_fmt(i['final_value'])}</td>"
        f"<td class=\"num\">{_pct(i['share_of_kept_beaten'])}</td>"
        f"<td>{'yes' if i['false_prune'] else 'no'}</td></tr>"
        for i in a["trials"])
    return (f'<section id="audit">\n<h2>Pruning audit</h2>\n<p>{_e(verdict)}</p>\n'
            f"<table><thead>{head}</thead><tbody>{trs}</tbody></table>\n</section>")


def _pruned_at(item: dict[str, Any], resource: str) -> str:
    """Where the pruner stopped an audited trial: its step, and in examples also the epoch."""
    at = step_in_words(item["prune_step"], resource)
    if resource == "examples" and isinstance(item.get("pruned_epochs"), int | float):
        at += f" (epoch {item['pruned_epochs']:.2f})"
    return at


def _plots(pngs: dict[str, bytes]) -> str:
    figs = []
    for name, png in pngs.items():
        data = base64.b64encode(png).decode("ascii")
        figs.append(
            f'<figure id="plot-{_e(name)}"><img alt="{_e(name.replace("_", " "))}" '
            f'width="{PLOT_WIDTH_PX}" height="{PLOT_HEIGHT_PX}" '
            f'src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(_PLOT_CAPTIONS[name])}</figcaption></figure>")
    return '<section id="plots">\n<h2>Pictures</h2>\n' + "\n".join(figs) + "\n</section>"


def _closest(rows: list[dict[str, Any]], maximize: bool) -> list[dict[str, Any]]:
    """The STOPPED_ROWS stopped trials that reached the best values, best first (a trial's
    value, else the best it reached before it stopped; those without either last)."""
    def key(r: dict[str, Any]) -> tuple[bool, float, int]:
        v = r.get("value")
        v = v if isinstance(v, int | float) else (r.get("details") or {}).get("best_value")
        if not isinstance(v, int | float):
            return (True, 0.0, r.get("number") or 0)
        return (False, -v if maximize else v, r.get("number") or 0)
    return sorted(rows, key=key)[:STOPPED_ROWS]


def _stopped(rows: list[dict[str, Any]], spec: dict[str, Any], maximize: bool = True) -> str:
    heading = (f"Trials stopped before max_epochs ({spec.get('max_epochs', '?')}): "
               f"{len(rows):,}")
    if not rows:
        return (f'<section id="stopped">\n<h2>{_e(heading)}</h2>\n'
                "<p>Every finished trial ran to max_epochs.</p>\n</section>")
    note = ""
    if len(rows) > STOPPED_ROWS:
        reasons = Counter(str(r.get("stop_reason")) for r in rows)
        note = (f'<p class="note">The {STOPPED_ROWS} of {len(rows):,} that reached the best '
                "values, best first (" + ", ".join(f"{n:,} {_e(k)}" for k, n in
                                                   reasons.most_common())
                + "); the CSV and the JSON report list every one.</p>\n")
        rows = _closest(rows, maximize)
    params = sorted({p for r in rows for p in (r.get("params") or {})}, key=_param_order)
    head = ("<tr><th class=\"num\">#</th><th>state</th><th class=\"num\">stopped at</th>"
            "<th class=\"num\">best epoch</th>"
            + "".join(f'<th class="num">{_e(p)}</th>' for p in params)
            + "<th>why</th></tr>")
    trs = []
    for r in rows:
        state = str(r.get("state", ""))
        cells = [
            f'<td class="num">{_e(r.get("number"))}</td>',
            f'<td class="state-{_e(state)}">{_e(state)}</td>',
            f'<td class="num">{_e(_fmt(r.get("stopped_epoch")))}</td>',
            f'<td class="num">{_e(_fmt(r.get("best_epoch")))}</td>',
            *(f'<td class="num">{_e(_fmt((r.get("params") or {}).get(p)))}</td>'
              for p in params),
            f'<td>{_e(r.get("reason") or r.get("stop_reason") or "")}</td>',
        ]
        trs.append(f'<tr id="trial-{_e(r.get("number"))}">' + "".join(cells) + "</tr>")
    return (f'<section id="stopped">\n<h2>{_e(heading)}</h2>\n{note}<div class="scroll"><table>'
            f'<thead>{head}</thead><tbody>{"".join(trs)}</tbody></table></div>\n</section>')


# --- formatting helpers ------------------------------------------------------------------------


def _e(v: Any) -> str:
    """Escaped text of any value, safe in element content and in quoted attributes."""
    return html.escape(str(v), quote=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _pct(v: Any) -> str:
    return f"{float(v):.1%}" if isinstance(v, int | float) else "-"


def _duration(seconds: Any) -> str:
    """Seconds as a person reads them: 42.3 s, 3 min 05 s, 2 h 07 min."""
    if not isinstance(seconds, int | float):
        return "-"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _param_order(name: str) -> tuple[int, str]:
    order = {p: i for i, p in enumerate(CORE_PARAMS)}
    return (order.get(name, len(order)), name)


def _fixed(spec: dict[str, Any]) -> dict[str, Any]:
    """Dimensions the spec held constant, as {name: value}."""
    space = spec.get("search_space") or {}
    return {k: d["value"] for k, d in space.items()
            if isinstance(d, dict) and set(d) == {"value"}}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
