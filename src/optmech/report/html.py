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

#: Caveats every report carries (READING.md §3 and §5).
CAVEATS = [
    "Figure 1 (the models a–d) is reconstructed, not read: a = ResNet class without shortcuts, b = with shortcuts, "
    "c = SNet (as intended, without the authors' setattr bug) without skip connections, d = with them (READING.md §3, "
    "hypothesis H1, moderate confidence). The mapping is one table (optmech.models.PAPER_MAPPINGS).",
    "Every quantity of a record is measured on the same probe sample, so Theorem 3 brackets the fitting error exactly. "
    "The authors' code took the fitting error from one test image and the bounds from another (the 'As published' figure).",
    "A final biased Linear layer forces λmin ≥ 1 + ‖h‖², so U ≤ 0 and L ≤ 0 in all four models (F1): "
    "'U decreases to 0' can only mean that |U| shrinks.",
    "In deep plain networks under PyTorch's default initialisation the signal vanishes and A_x → I: U, L, G → 0 is then "
    "the vanishing-gradient regime, not a well-conditioned one (F3).",
    "Near-1 local correlations follow largely from Theorem 3 plus a small G: the fitting error is squeezed between two "
    "curves G bits apart.",
    "Theorem 4 is a statement about random matrices; it is checked by Monte Carlo, not on networks (the GIC is only "
    "approached through proxies).",
    "Logarithms in records and figures are base 2; inside Lemma 2, Theorem 4 and Z they are natural (BHK).",
]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.86em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#f5f5f5}.holds{background:#e3f6e3}.fails{background:#fbe1e1}.inconclusive{background:#f4f1dc}
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


def _claims_table(claims: list[dict]) -> str:
    rows = ["<tr><th>id</th><th>source</th><th>the paper says</th><th>our test</th><th>measured</th><th>verdict</th></tr>"]
    for c in claims:
        note = f"<br><span class='small'>{_esc(c['note'])}</span>" if c.get("note") else ""
        details = _esc(json.dumps(c["units"], ensure_ascii=False))
        rows.append(
            f"<tr class='{c['verdict']}'><td><b>{_esc(c['id'])}</b></td><td>{_esc(c['source'])}</td><td>{_esc(c['statement'])}</td>"
            f"<td>{_esc(c['operationalisation'])}</td><td>{_esc(units_summary(c))}{note}"
            f"<details><summary class='small'>values</summary><code class='small'>{details}</code></details></td>"
            f"<td><b>{_esc(c['verdict'])}</b></td></tr>"
        )
    return "<table>" + "\n".join(rows) + "</table>"


def _kv_table(pairs) -> str:
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs) + "</table>"


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

    counts = claims_doc["counts"]
    jobs = rep.meta.get("jobs", {})
    sessions = rep.meta.get("sessions", [])
    timing_rows = [(k, f"{v['wall_s']:.1f} s") for k, v in sorted(jobs.items(), key=lambda kv: -kv[1]["wall_s"])]
    setup = [("preset", f"{cfg['name']} — {cfg.get('description', '')}"), ("dataset", cfg["dataset"]),
             ("a–d mapping", cfg["mapping"]), ("training seeds", cfg["seeds"]),
             ("Figs 2–4", f"models {cfg['bounds_models']} at k = {cfg['bounds_depth']}"),
             ("Figs 6–9", f"models {cfg['depth_models']} at k = {cfg['depths']}"),
             ("training settings (beyond the paper's defaults)", cfg["train"] or "paper defaults"),
             ("Fig. 5 sweep", cfg["sweep"]), ("theory", cfg["theory"]), ("claim thresholds", cfg["claims"])]
    first = next(iter(rep.train_meta.values()), None)
    if first is not None:
        setup.insert(3, ("training run settings", {k: first["config"][k] for k in ("optimizer", "lr", "momentum", "batch_size", "epochs",
                                                                                  "init", "loss", "probe_every", "n_probe", "dtype")}))
        setup.insert(4, ("data sizes", first["data"] | {"probe_ids": first["data"]["probe_ids"][:8]}))
    body = [
        f"<h1>optmech reproduction of Qi, Gong &amp; Li (arXiv 2503.23016) — preset <code>{_esc(cfg['name'])}</code></h1>",
        f"<p class='small'>Built {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {_esc(run_dir)} (records only). "
        f"Claims: {counts.get('holds', 0)} hold, {counts.get('fails', 0)} fail, {counts.get('inconclusive', 0)} inconclusive.</p>",
        "<h2>Setup</h2>", _kv_table(setup),
        "<h2>Environment</h2>", _kv_table(sorted(rep.meta.get("versions", {}).items())),
        "<h2>Claims</h2>", f"<p>{_esc(claims_doc.get('rule', ''))}</p>", _claims_table(claims_doc["claims"]),
        "<h2>Figures</h2>", *figure_html,
        *([f"<p>Not drawn (records missing): {_esc(', '.join(missing))}</p>"] if missing else []),
        "<h2>Caveats</h2><ul>" + "".join(f"<li>{_esc(c)}</li>" for c in CAVEATS) + "</ul>",
        *_experiments_table(rep.meta),
        "<h2>Timings</h2>",
        _kv_table([(f"session {i + 1} ({s['jobs']} processes)", f"{s['wall_s']:.1f} s wall, {len(s['ran'])} jobs run")
                   for i, s in enumerate(sessions)]),
        "<details><summary>per job</summary>" + _kv_table(timing_rows) + "</details>",
    ]
    page = f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>optmech — {_esc(cfg['name'])}</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
    out = run_dir / "report.html"
    with atomic_write(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
