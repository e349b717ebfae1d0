"""One self-contained HTML report of a reproduction, built from its records and claims.json only.

    path = build_report("runs/quick")      # writes runs/quick/figures/*.png|svg and runs/quick/report.html
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from ..records import atomic_write, read_json, read_reproduction
from .figures import save_figure
from .paper_figures import FIGURES

__all__ = ["build_report", "CAVEATS"]

#: Caveats every report carries (READING.md §3 and §5), by id; a claim names the ids that qualify it and the
#: report prints those beside the claim, the rest at the end.
CAVEATS = {
    "fig1": "Figure 1 (the models a–d) is reconstructed, not read: a = ResNet class without shortcuts, b = with shortcuts, "
            "c = SNet (as intended, without the authors' setattr bug) without skip connections, d = with them (READING.md §3, "
            "hypothesis H1, moderate confidence). The mapping is one table (optmech.models.PAPER_MAPPINGS).",
    "same-sample": "Every quantity of a record is measured on the same probe sample, so Theorem 3 brackets the fitting error "
                   "exactly. The authors' code took the fitting error from one test image and the bounds from another (the "
                   "'As published' figure).",
    "F1": "A final biased Linear layer forces λmin ≥ 1 + ‖h‖², so U ≤ 0 and L ≤ 0 in all four models (F1): 'U decreases to "
          "0' can only mean that |U| shrinks.",
    "F3": "In deep plain networks under PyTorch's default initialisation the signal vanishes and A_x → I: U, L, G → 0 is then "
          "the vanishing-gradient regime, not a well-conditioned one (F3). Such runs and models are gated as degenerate.",
    "bracket": "Near-1 local correlations follow largely from Theorem 3 plus a small G: the fitting error is squeezed between "
               "two curves G bits apart. The time-shuffle null measures how often a test passes for that reason alone.",
    "T4": "Theorem 4 is a statement about random matrices; it is checked by Monte Carlo, not on networks (the GIC is only "
          "approached through proxies).",
    "logs": "Logarithms in records and figures are base 2; inside Lemma 2, Theorem 4 and Z they are natural (BHK).",
}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.86em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#f5f5f5}.holds{background:#e3f6e3}.fails{background:#fbe1e1}.inconclusive{background:#f4f1dc}.not-measurable{background:#eeeeee}
.answer{background:#f7f9fc;border:1px solid #d6dfeb;padding:.6em 1.2em;border-radius:4px}.answer li{margin:.25em 0}.caveat{color:#6a4b00}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#333}
code{background:#f5f5f5;padding:0 .2em}.small{font-size:.8em;color:#555}
"""


def _esc(x) -> str:
    return html.escape(str(x))


def units_summary(claim: dict) -> str:
    passes = [u["pass"] for u in claim["units"].values() if isinstance(u, dict) and "pass" in u]
    known = [p for p in passes if p is not None]
    if not passes:
        scalars = {k: [v for v in u.values() if isinstance(v, (str, bool))] for k, u in claim["units"].items() if isinstance(u, dict)}
        if scalars and all(scalars.values()):
            return ", ".join(f"{k}: {' '.join(map(str, v))}" for k, v in scalars.items())
        return f"{len(claim['units'])} values reported, none tested"
    return f"{sum(bool(p) for p in known)} of {len(passes)} units pass" + (f", {len(passes) - len(known)} not measurable" if len(known) < len(passes) else "")


def _css_class(verdict: str) -> str:
    return verdict.replace(" ", "-")


def _effect_cell(claim: dict) -> str:
    e = claim.get("effect")
    if not e:
        return _esc(units_summary(claim))
    value = "—" if e.get("value") is None else f"{e['value']:.3g}"
    rate = e.get("null_false_pass_rate")
    null = (f"<br><span class='small'>null ({_esc(e['null'])}): passes {100 * rate:.1f} % of {e['null_draws']} draws"
            + (f"; null effect 5–95 %: {e['null_effect_q05']:.3g} to {e['null_effect_q95']:.3g}" if e.get("null_effect_q95") is not None else "")
            + "</span>") if rate is not None else "<br><span class='small'>no null draw (nothing measurable)</span>"
    return f"<b>{value}</b> {_esc(e['name'])}, needs {_esc(e['threshold'])}{null}<br><span class='small'>{_esc(units_summary(claim))}</span>"


def _claims_table(claims: list[dict]) -> str:
    rows = ["<tr><th>id</th><th>kind</th><th>the paper says</th><th>our test</th><th>effect and null</th><th>verdict and reason</th></tr>"]
    for c in claims:
        note = f"<br><span class='small'>{_esc(c['note'])}</span>" if c.get("note") else ""
        caveats = "".join(f"<br><span class='small caveat'>Caveat: {_esc(CAVEATS[k])}</span>" for k in c.get("caveats") or () if k in CAVEATS)
        details = _esc(json.dumps(c["units"], ensure_ascii=False))
        rows.append(
            f"<tr class='{_css_class(c['verdict'])}' id='claim-{_esc(c['id'])}'><td><b>{_esc(c['id'])}</b><br><span class='small'>"
            f"{_esc(c['source'])}</span></td><td>{_esc(c['kind'])}</td><td>{_esc(c['statement'])}</td>"
            f"<td>{_esc(c['operationalisation'])}</td><td>{_effect_cell(c)}"
            f"<details><summary class='small'>values per unit</summary><code class='small'>{details}</code></details></td>"
            f"<td><b>{_esc(c['verdict'])}</b><br><span class='small'>{_esc(c.get('reason', ''))}</span>{note}{caveats}</td></tr>"
        )
    return "<table>" + "\n".join(rows) + "</table>"


def _edge_verdicts(without_edge: dict | None) -> str:
    """The answer's sentence on what the verdicts become when the learned runs at the edge of learning count as not
    measurable (claims.json's ``without_edge_runs``, :func:`optmech.experiments.claims.edge_sensitivity`), or ''."""
    if not without_edge:
        return ""
    runs = ", ".join(without_edge["runs"])
    moved = without_edge.get("moved") or {}
    if not moved:
        return (f"<p><b>Without the runs that learned late</b> ({_esc(runs)}), counted as not measurable: no verdict moves.</p>")
    items = "".join(f"<li><a href='#claim-{_esc(cid)}'><b>{_esc(cid)}</b></a>: {_esc(m['from'])} → <b>{_esc(m['to'])}</b> "
                    f"<span class='small'>— {_esc(m.get('reason', ''))}</span></li>" for cid, m in moved.items())
    return (f"<p><b>Without the runs that learned late</b> ({_esc(runs)}), counted as not measurable, "
            f"{len(moved)} verdict{'s' if len(moved) != 1 else ''} move{'s' if len(moved) == 1 else ''}. These verdicts rest on "
            "those runs: read them as fragile, not as corrected (how late a run learns is tied to the timings that the onset "
            f"and correlation claims measure, so leaving such runs out is a selection of its own).</p><ul>{items}</ul>")


def _answer(claims: list[dict], runs: dict, summary: str, inits: list[str], without_edge: dict | None = None) -> str:
    """The report's first section: what of the paper holds, fails, cannot be decided, and why, in sentences."""
    empirical = [c for c in claims if c["kind"] == "empirical"]
    by = {v: [c for c in empirical if c["verdict"] == v] for v in ("holds", "fails", "inconclusive", "not measurable")}

    def items(cs):
        return "".join(f"<li><a href='#claim-{_esc(c['id'])}'><b>{_esc(c['id'])}</b></a> ({_esc(c['source'])}): {_esc(c['statement'])}"
                       f" <span class='small'>— {_esc(c.get('reason', ''))}</span></li>" for c in cs)

    parts = ["<div class='answer'><h2>The answer first</h2>"]
    explained = False  # the edge-of-learning caveat, said once
    for init in [i for i in inits if any(r.get("init") == i for r in runs.values())]:
        arm = {k: r for k, r in runs.items() if r.get("init") == init}
        failed = [(k, r) for k, r in arm.items() if not r.get("learned")]
        accs = [r["heldout_accuracy"] for r in arm.values() if r.get("heldout_accuracy") is not None]
        parts.append(f"<p><b>Training, init {_esc(init)}.</b> {len(arm) - len(failed)} of {len(arm)} runs learned (final held-out "
                     f"accuracy {min(accs):.3f}–{max(accs):.3f}). "
                     + ("Did not learn: " + _esc(", ".join(f"{k.rsplit(' ', 1)[0]} (" + (f"diverged at step {r['diverged_at_step']}"
                                                                    if r.get("diverged_at_step") is not None else f"{r['heldout_accuracy']:.2f}") + ")"
                                                        for k, r in failed))
                        + "; their trend claims are not measurable, never evidence." if failed else "")
                     + _edge_sentence(arm, explain=not explained) + "</p>")
        explained = explained or any(r.get("edge") for r in arm.values())
    parts.append(_edge_verdicts(without_edge))
    if len(inits) > 1:
        parts.append(f"<p class='small'>A claim id without brackets is decided on the main arm (init {_esc(inits[0])}); "
                     "[name] marks another initialisation arm of the same claim.</p>")
    for verdict, head in (("holds", "What of the paper holds"), ("fails", "What fails"),
                          ("inconclusive", "What cannot be decided from these records"), ("not measurable", "What could not be measured")):
        if by[verdict]:
            parts.append(f"<p><b>{head}</b> ({len(by[verdict])} empirical claim{'s' if len(by[verdict]) != 1 else ''}):</p><ul>{items(by[verdict])}</ul>")
    others = [c for c in claims if c["kind"] in ("identity", "theory")]
    if others:
        bad = [c for c in others if c["verdict"] != "holds"]
        parts.append(f"<p><b>Identities and theory checks.</b> {len(others) - len(bad)} of {len(others)} hold. Identities (Theorem 3 "
                     "on every row, ‖g‖² = eᵀAe, F1, Lemma 1, Proposition 1) hold by mathematics: they confirm the software, not the "
                     "paper's reading of its experiments."
                     + (f" Not holding: {_esc(', '.join(c['id'] + ' ' + c['verdict'] for c in bad))} (see the table)." if bad else "") + "</p>")
    parts.append(f"<p class='small'>Counts — {_esc(summary)}.</p></div>")
    return "".join(parts)


def _edge_sentence(arm: dict, explain: bool = True) -> str:
    """' At the edge of learning: …' for the runs of one arm that sit there (``run_table``'s ``edge``), with what it
    means when ``explain``; or ''."""
    edge = [(k, r["edge"]) for k, r in arm.items() if r.get("edge")]
    if not edge:
        return ""
    return (" At the edge of learning: " + _esc("; ".join(f"{k.rsplit(' ', 1)[0]} ({why})" for k, why in edge)) + "."
            + (" Whether such a run learns can change with the floating-point kernels a CPU selects (the same code and seed "
               "learn on one machine and stay at chance on another), and with it the verdicts of the claims it enters: rerun "
               "them elsewhere, or with more seeds, before leaning on those verdicts." if explain else ""))


def _runs_table(runs: dict) -> str:
    if not runs:
        return ""
    rows = ["<tr><th>run</th><th>steps</th><th>held-out accuracy</th><th>held-out loss</th><th>learned</th></tr>"]
    for key, r in runs.items():
        acc = "—" if r.get("heldout_accuracy") is None else f"{r['heldout_accuracy']:.3f}"
        loss = "—" if r.get("heldout_loss") is None else f"{r['heldout_loss']:.3f}"
        cls = "holds" if r.get("learned") else "fails"
        why = r.get("why") if not r.get("edge") else f"{r.get('why')}; at the edge of learning ({r['edge']})"
        rows.append(f"<tr class='{cls}'><td>{_esc(key)}</td><td>{_esc(r.get('steps'))}</td><td>{acc}</td><td>{loss}</td>"
                    f"<td>{_esc(why)}</td></tr>")
    return "<h2>Training runs</h2><p class='small'>Final held-out accuracy and loss on every held-out image after the last step; the " \
           "learning curves are in the figures.</p><table>" + "".join(rows) + "</table>"


def _readable(value) -> str:
    """A setting's value as text: dicts as 'key = value' pairs, lists joined."""
    if isinstance(value, dict):
        return "; ".join(f"{k} = {_readable(v)}" for k, v in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(_readable(v) for v in value)
    return str(value)


def _kv_table(pairs) -> str:
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_readable(v))}</td></tr>" for k, v in pairs) + "</table>"


def _experiments_table(meta: dict) -> list[str]:
    experiments, jobs = meta.get("experiments"), meta.get("jobs", {})
    if not experiments:
        return []
    rows = ["<tr><th>experiment</th><th>what</th><th>figures</th><th>claims</th><th>jobs</th><th>job time</th></tr>"]
    for eid, e in experiments.items():
        wall = sum(jobs.get(k, {}).get("wall_s", 0.0) for k in e["jobs"])
        rows.append(f"<tr><td>{_esc(eid)}</td><td>{_esc(e['title'])}</td><td>{_esc(', '.join(e['figures']))}</td>"
                    f"<td>{_esc(', '.join(e['claims']))}</td><td>{len(e['jobs'])}</td><td>{wall:.0f} s</td></tr>")
    return ["<h2>Experiments</h2><p class='small'>A job shared by two experiments runs once and is timed under both.</p>",
            "<table>" + "".join(rows) + "</table>"]


def build_report(run_dir: str | Path) -> Path:
    """Draw every figure of :data:`FIGURES` from the records, and write ``report.html`` (figures embedded).

    Needs ``claims.json`` beside the records (written by the claims checker). Returns the report's path.
    """
    run_dir = Path(run_dir)
    rep = read_reproduction(run_dir)
    claims_path = run_dir / "claims.json"
    if not claims_path.is_file():
        raise FileNotFoundError(f"{claims_path}: expected the claims checker's output, found none. Run `optmech report {run_dir}`.")
    claims_doc = read_json(claims_path)
    by_id = {c["id"]: c for c in claims_doc["claims"]}
    cfg = rep.meta["config"]

    figure_html, missing = [], []
    for spec in FIGURES:
        fig = spec.draw(rep)
        if fig is None:
            missing.append(spec.title)
            continue
        png, _svg = save_figure(fig, run_dir / "figures" / spec.id)
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        measured = "; ".join(f"<b>{_esc(cid)}</b> {_esc(by_id[cid]['verdict'])} ({_esc(units_summary(by_id[cid]))})"
                             for cid in spec.claims if cid in by_id)
        figure_html.append(
            f"<figure id='{spec.id}'><h3>{_esc(spec.title)}</h3><img alt='{_esc(spec.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption><b>Paper:</b> {_esc(spec.paper)}<br><b>Measured:</b> {measured or 'no claim evaluated'}. "
            f"<span class='small'>figures/{spec.id}.png, .svg</span></figcaption></figure>"
        )

    jobs = rep.meta.get("jobs", {})
    sessions = rep.meta.get("sessions", [])
    timing_rows = [(k, f"{v['wall_s']:.1f} s") for k, v in sorted(jobs.items(), key=lambda kv: -kv[1]["wall_s"])]
    inits = cfg.get("train_inits") or ["pytorch"]
    setup = [("preset", f"{cfg['name']} — {cfg.get('description', '')}"), ("dataset", cfg["dataset"]),
             ("a–d mapping", cfg["mapping"]), ("training seeds", cfg["seeds"]),
             ("initialisation arms of the training runs", f"{inits[0]} (main: Figs 2–4 and the main verdicts)"
              + (f"; {', '.join(inits[1:])} (Figs 6–9, verdicts marked [{inits[1]}])" if len(inits) > 1 else "")),
             ("Figs 2–4", f"models {', '.join(cfg['bounds_models'])} at k = {cfg['bounds_depth']}"),
             ("Figs 6–9", f"models {', '.join(cfg['depth_models'])} at k = {', '.join(map(str, cfg['depths']))}")]
    first = next(iter(rep.train_meta.values()), None)
    if first is not None:
        c = first["config"]
        steps = first["steps"]
        setup += [("optimiser", f"{c['optimizer']}, lr {c['lr']}, momentum {c['momentum']}, batch {c['batch_size']}"),
                  ("training length", f"{steps['total']} steps ({steps['total'] / steps['per_epoch']:.1f} passes over "
                                      f"{first['data']['train']} training images; the paper: 938 steps, one pass over 60,000)"),
                  ("loss, dtype", f"{c['loss']}, {c['dtype']}"),
                  ("probes", f"{c['n_probe']} fixed held-out images ({first['data']['heldout']} held out), a record every "
                             f"{c['probe_every']} steps; held-out loss and accuracy every {c.get('eval_every', '—')} steps and after the last")]
    setup += [("Fig. 5 sweep", cfg["sweep"]), ("theory", cfg["theory"])]
    body = [
        f"<h1>optmech reproduction of Qi, Gong &amp; Li (arXiv 2503.23016) — preset <code>{_esc(cfg['name'])}</code></h1>",
        f"<p class='small'>Built {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {_esc(run_dir)} (records only).</p>",
        _answer(claims_doc["claims"], claims_doc.get("runs", {}), claims_doc.get("summary", ""), inits, claims_doc.get("without_edge_runs")),
        "<h2>Setup</h2>", _kv_table(setup),
        _runs_table(claims_doc.get("runs", {})),
        "<h2>Claims</h2>", f"<p>{_esc(claims_doc.get('rule', ''))}</p>",
        "<details><summary>thresholds, fixed in the preset before the runs</summary>" + _kv_table(sorted(cfg["claims"].items())) + "</details>",
        _claims_table(claims_doc["claims"]),
        "<h2>Figures</h2>", *figure_html,
        *([f"<p>Not drawn (records missing): {_esc(', '.join(missing))}</p>"] if missing else []),
        "<h2>Caveats</h2><ul>" + "".join(f"<li>{_esc(c)}</li>" for c in CAVEATS.values()) + "</ul>",
        "<h2>Environment</h2>", _kv_table(sorted(rep.meta.get("versions", {}).items())),
        *_experiments_table(rep.meta),
        "<h2>Timings</h2>",
        _kv_table([(f"run {i + 1} of the command ({s['jobs']} processes)", f"{s['wall_s']:.1f} s wall, {len(s['ran'])} jobs run")
                   for i, s in enumerate(sessions)]),
        "<details><summary>per job</summary>" + _kv_table(timing_rows) + "</details>",
    ]
    page = f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>optmech — {_esc(cfg['name'])}</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
    out = run_dir / "report.html"
    with atomic_write(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
