"""Claims about training runs and the depth sweep (READING.md §2: C2.1 … C8/9.2, Sec. 5.3.2).

Series are per record the median over the fixed probe samples (training-batch rows excluded), the
same curves the figures draw. Iterations are optimiser steps ("batch index").
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..metrics import local_pearson
from ..records import Reproduction, fixed_probe_medians
from .claims import Claim, combine, make_claim, unit_passes
from .reproduce_config import ClaimSettings, ReproduceConfig

__all__ = ["training_claims", "onset", "structural_convergence", "first_sustained_high"]

_DEGENERATE = ("Where A_x ≈ I (deep plain nets under PyTorch's default init, READING.md F3) the Theorem 3 bracket is nearly "
               "closed, so r ≈ 1 from the first full window: an early t(a, k) there reflects the vanishing signal.")

_SERIES = ["log_fitting_error", "lower", "upper", "U", "L", "G", "log_gradient_norm"]


def onset(series: pd.DataFrame, s: ClaimSettings) -> float | None:
    """First step at which the ``s.smooth``-record moving median of log₂ E_f is ``s.onset_drop_bits``
    below the median of the first 10 records (READING.md Fig. 6); None if it never is."""
    a = series["log_fitting_error"]
    base = a.iloc[:10].median()
    smooth = a.rolling(s.smooth, min_periods=1).median()
    hit = smooth.index[smooth <= base - s.onset_drop_bits]
    return float(hit[0]) if len(hit) else None


def structural_convergence(series: pd.DataFrame, s: ClaimSettings) -> float:
    """First step after which |G − G_final| stays below ``s.converge_tol_bits``; G_final is the
    median of the last 50 records (a quarter of the run when shorter)."""
    G = series["G"]
    final = G.iloc[-min(50, max(1, len(G) // 4)):].median()
    outside = np.flatnonzero((G - final).abs().to_numpy() >= s.converge_tol_bits)
    if not len(outside):
        return float(G.index[0])
    nxt = outside[-1] + 1
    return float(G.index[min(nxt, len(G) - 1)])


def _local_r(series: pd.DataFrame, s: ClaimSettings) -> pd.DataFrame:
    a = series["log_fitting_error"]
    return pd.DataFrame({b: local_pearson(a, series[b], window=s.window, growing_from=s.growing_from) for b in ("upper", "lower")},
                        index=series.index)


def first_sustained_high(series: pd.DataFrame, s: ClaimSettings) -> float | None:
    """First step (window end) after which r(E_f, upper) and r(E_f, lower) both stay ≥ ``s.r_high``; None if never."""
    r = _local_r(series, s).min(axis=1, skipna=False)
    ok = (r >= s.r_high).to_numpy()
    if not len(ok) or not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    return float(r.index[bad[-1] + 1]) if len(bad) else float(r.index[0])


def _spearman(x, y) -> float:
    x, y = pd.Series(list(x), dtype=float), pd.Series(list(y), dtype=float)
    if x.nunique() < 2 or y.nunique() < 2:
        return math.nan
    return float(x.corr(y, method="spearman"))


def _total(rep: Reproduction, key) -> int:
    return int(rep.train_meta[key]["steps"]["total"])


def _bounds_units(rep, config):
    return {f"{m} s{s}": (m, config.bounds_depth, s) for m in config.bounds_models for s in config.seeds
            if (m, config.bounds_depth, s) in rep.train}


def _fig2_claims(rep: Reproduction, config: ReproduceConfig) -> list[Claim]:
    s = config.claims
    units21, units22, units23, units31, units32, units41, units42 = {}, {}, {}, {}, {}, {}, {}
    for name, key in _bounds_units(rep, config).items():
        rec, total = rep.train[key], _total(rep, key)
        units21[name] = {"rows": len(rec), "violations": int((~rec["bound_holds"]).sum()),
                         "rank_deficient": int(rec["rank_deficient"].sum()), "pass": bool(rec["bound_holds"].all())}
        ser = fixed_probe_medians(rec, _SERIES)
        edge = max(1, min(s.edge_iters, total // 4))
        g_first, g_last = ser["G"][ser.index < edge].median(), ser["G"][ser.index >= total - edge].median()
        units22[name] = {"G_first": g_first, "G_last": g_last, "edge_iters": edge, "pass": bool(g_last < g_first)}
        local = _local_r(ser, s)
        r = local.mean(axis=1)
        half = total / 2
        r_early, r_late = r[r.index < half].mean(), r[r.index >= half].mean()
        units23[name] = {"mean_r_first_half": r_early, "mean_r_second_half": r_late,
                         "pass": None if math.isnan(r_early) or math.isnan(r_late) else bool(r_late > r_early)}
        late = s.late_fraction * total
        r_min = local.min(axis=1, skipna=False)
        after = r_min[r_min.index >= late].dropna()
        units31[name] = {"after_batch": late, "windows": len(after), "min_r": after.min() if len(after) else None,
                         "pass": bool(after.min() >= s.r_high) if len(after) else None}
        before = r[(r.index < late)].dropna()
        units32[name] = {"mean_r_before": before.mean() if len(before) else None, "mean_r_after": r[r.index >= late].mean(),
                         "pass": bool(before.mean() < r[r.index >= late].mean()) if len(before) else None}
        moving = (ser["U"].rolling(s.window).std() + ser["L"].rolling(s.window).std())
        r_g = pd.Series(local_pearson(ser["log_gradient_norm"], ser["log_fitting_error"], window=s.window,
                                      growing_from=s.growing_from), index=ser.index)
        frame = pd.DataFrame({"moving": moving, "r": r_g}).dropna()
        if len(frame) >= 4:
            cut = frame["moving"].median()
            stable, mov = frame["r"][frame["moving"] <= cut].median(), frame["r"][frame["moving"] > cut].median()
            ok = bool(stable >= s.r_high and (math.isnan(mov) or stable > mov))
            units41[name] = {"median_r_stable_windows": stable, "median_r_moving_windows": mov, "pass": ok}
        else:
            units41[name] = {"pass": None, "why": "fewer than 4 full windows"}
        dG = ser["G"].diff().abs().dropna()
        q = max(1, len(dG) // 4)
        units42[name] = {"mean_abs_dG_first_quarter": dG.iloc[:q].mean(), "mean_abs_dG_last_quarter": dG.iloc[-q:].mean(),
                         "pass": bool(dG.iloc[:q].mean() > dG.iloc[-q:].mean()) if len(dG) else None}
    w = f"{s.window}-record windows"
    return [
        make_claim("C2.1", "Fig. 2", "The fitting error lies between its lower and upper bounds throughout training.",
                   "lower ≤ log₂E_f ≤ upper (Theorem 3, same sample, rtol 1e-9) on every probe row of every run of models "
                   "a–d at k = 1.", "exact", units21),
        make_claim("C2.2", "Fig. 2", "The gap between the bounds (G) narrows as training proceeds.",
                   f"median G over the last {s.edge_iters} iterations < median over the first {s.edge_iters} (at most a quarter "
                   "of the run each), per model and seed.", "trend", units22),
        make_claim("C2.3", "Fig. 2", "The fitting error increasingly aligns with the trends of its bounds.",
                   f"mean local Pearson r(log₂E_f, bound) over {w} is larger in the run's second half than in its first.",
                   "trend", units23),
        make_claim("C3.1", "Fig. 3", "After batch ~500 the local correlations of the fitting error with both bounds approach 1.",
                   f"every full {w} ending after {s.late_fraction:.3f} of the run (batch 500 of 938) has r ≥ {s.r_high} "
                   "with both bounds.", "trend", units31),
        make_claim("C3.2", "Fig. 3", "Earlier in training the local correlation is lower.",
                   "mean local r (both bounds) over windows ending before that point < mean over windows ending after it.",
                   "trend", units32),
        make_claim("C4.1", "Fig. 4", "The gradient norm controls the fitting error only when the structural error stays constant.",
                   f"over {w}: split windows at the median of std(U) + std(L); the median local r(log₂‖g‖², log₂E_f) in the "
                   f"stable half is ≥ {s.r_high} and above the moving half's.", "trend", units41),
        make_claim("C4.2", "Sec. 4.3.2", "The structural error changes strongly early in training and then stabilises.",
                   "mean |ΔG| per record over the first quarter of the records > over the last quarter.", "trend", units42),
    ]


def _sweep_stats(sweep: pd.DataFrame, init: str, model: str) -> pd.DataFrame:
    rows = sweep[(sweep["init"] == init) & (sweep["model"] == model)]
    out = {}
    for col in ("U", "L", "G"):
        finite = rows[np.isfinite(rows[col])]
        out[col] = finite.groupby("depth")[col].median()
    return pd.DataFrame(out).sort_index()


def _fig5_claims(rep: Reproduction, config: ReproduceConfig) -> list[Claim]:
    s, sweep = config.claims, rep.sweep
    if not len(sweep):
        return []
    inits = [i for i in config.sweep.inits if i in set(sweep["init"])]
    per_init = {}
    for init in inits:
        u51, u52, u53 = {}, {}, {}
        for m in ("a", "c"):
            st = _sweep_stats(sweep, init, m)
            if len(st) < 2:
                continue
            k0, kmax = st.index[0], st.index[-1]
            for col in ("U", "L", "G"):
                v0, v1 = abs(st[col].iloc[0]), abs(st[col].iloc[-1])
                u51[f"{m} |{col}|"] = {f"k={k0}": v0, f"k={kmax}": v1, "pass": bool(v1 <= s.near_zero_fraction * v0)}
        for m in ("b", "d"):
            st = _sweep_stats(sweep, init, m)
            if len(st) < 2:
                continue
            for col, sign in (("U", -1), ("L", -1), ("G", 1)):
                rho = _spearman(st.index, st[col])
                u52[f"{m} {col}"] = {"spearman_k": rho, "per_k": st[col].to_dict(),
                                     "pass": None if math.isnan(rho) else bool(sign * rho >= s.rank_threshold)}
            u53[m] = {"min_G_over_k": st["G"].min(), "pass": bool(st["G"].min() >= s.big_gap_bits)}
        per_init[init] = (u51, u52, u53)
    main = inits[0]
    others = ", ".join(i for i in inits[1:])
    claims = []
    texts = {
        0: ("C5.1", "For models a and c (no skip connections) U, L and G rapidly decrease and approach zero as depth grows.",
            f"at initialisation, median over seeds × probes: |U|, |L| and G at the largest depth ≤ {s.near_zero_fraction} × "
            "their value at the smallest depth (U, L ≤ 0 by F1, so 'decrease to 0' means |U|, |L| shrink)."),
        1: ("C5.2", "For models b and d (skip connections) U and L decrease and G increases with depth.",
            f"Spearman ρ between k and the per-k median: ρ(U) ≤ −{s.rank_threshold}, ρ(L) ≤ −{s.rank_threshold}, "
            f"ρ(G) ≥ {s.rank_threshold}."),
        2: ("C5.3", "For models b and d, U ≫ L.", f"the per-k median G = U − L is ≥ {s.big_gap_bits} bits at every depth."),
    }
    for i, (cid, statement, op) in texts.items():
        units = {f"[{main}] {k}": v for k, v in per_init[main][i].items()}
        verdict_main = combine_units(units)
        note = ""
        for init in inits[1:]:
            other = {f"[{init}] {k}": v for k, v in per_init[init][i].items()}
            note += f"Under init {init}: {combine_units(other)}. "
            units.update({k: {**{kk: vv for kk, vv in v.items() if kk != "pass"}, "sensitivity_pass": v.get("pass")} for k, v in other.items()})
        claims.append(make_claim(cid, "Fig. 5", statement, op + f" Verdict from init {main}; {others or 'no other arm'} shown as sensitivity.",
                                 "trend", units, note=note.strip(), verdict=verdict_main))
    if len(inits) > 1:
        verdicts = {init: combine_units(per_init[init][0]) for init in inits}
        found = set(verdicts.values())
        claims.append(make_claim(
            "C5.init", "READING.md §2", "(Ours) The plain-model claim of Fig. 5 depends on reading 'default (He)' initialisation.",
            "C5.1 holds under one initialisation arm and fails under another (fails when every arm gives the same verdict).",
            "trend", {init: {"C5.1": v, "units_passing": f"{sum(bool(x) for x in unit_passes(per_init[init][0]))} of "
                                                          f"{len(per_init[init][0])}"} for init, v in verdicts.items()},
            verdict="holds" if {"holds", "fails"} <= found else "fails" if len(found) == 1 else "inconclusive"))
    return claims


def combine_units(units: dict) -> str:
    return combine(unit_passes(units))


def _depth_claims(rep: Reproduction, config: ReproduceConfig) -> list[Claim]:
    s = config.claims
    depths = config.depths
    info = {}
    for (m, k, seed), rec in rep.train.items():
        if m in ("a", "b") and k in depths and seed in config.seeds:
            ser = fixed_probe_medians(rec, _SERIES)
            total = _total(rep, (m, k, seed))
            info[(m, k, seed)] = {"onset": onset(ser, s), "converge": structural_convergence(ser, s),
                                  "t_high": first_sustained_high(ser, s), "total": total, "series": ser}
    if not info:
        return []
    never = lambda v, total: total + 1 if v is None else v  # noqa: E731 - "never" is later than any step
    u61, u62, u63, u71, u72, u89a, u89b = {}, {}, {}, {}, {}, {}, {}
    for seed in config.seeds:
        ks = [k for k in depths if ("a", k, seed) in info]
        if len(ks) >= 2:
            on = [info[("a", k, seed)]["onset"] for k in ks]
            total = info[("a", ks[0], seed)]["total"]
            rho = _spearman(ks, [never(o, total) for o in on])
            u61[f"a s{seed}"] = {"onset_by_k": dict(zip(ks, on)), "spearman_k": rho,
                                 "pass": None if all(o is None for o in on) or math.isnan(rho) else bool(rho >= s.rank_threshold)}
            for col in ("U", "L", "G"):
                med = [info[("a", k, seed)]["series"][col].abs().median() for k in ks]
                rho = _spearman(ks, med)
                u63[f"a s{seed} |{col}|"] = {"median_by_k": dict(zip(ks, med)), "spearman_k": rho,
                                             "pass": None if math.isnan(rho) else bool(rho <= -s.rank_threshold)}
            t = [info[("a", k, seed)]["t_high"] for k in ks]
            rho = _spearman(ks, [never(v, total) for v in t])
            u89b[f"a s{seed}"] = {"t_high_by_k": dict(zip(ks, t)), "spearman_k": rho,
                                  "pass": None if all(v is None for v in t) or math.isnan(rho) else bool(rho >= s.rank_threshold)}
        kb = [k for k in depths if ("b", k, seed) in info]
        if len(kb) >= 2:
            g_first = [float(info[("b", k, seed)]["series"]["G"].iloc[0]) for k in kb]
            rho = _spearman(kb, g_first)
            u71[f"b s{seed}"] = {"G_first_record_by_k": dict(zip(kb, g_first)), "spearman_k": rho,
                                 "pass": None if math.isnan(rho) else bool(rho > -s.rank_threshold)}
            on_b = [info[("b", k, seed)]["onset"] for k in kb]
            total = info[("b", kb[0], seed)]["total"]
            known = [o for o in on_b if o is not None]
            u72[f"b s{seed} flat"] = {"onset_by_k": dict(zip(kb, on_b)),
                                      "pass": None if len(known) < 2 else bool(max(known) - min(known) <= 0.2 * total)}
        for k in depths:
            a, b = info.get(("a", k, seed)), info.get(("b", k, seed))
            if a is not None and a["onset"] is not None and a["onset"] >= 0:
                gap = abs(a["onset"] - a["converge"])
                u62[f"a k{k} s{seed}"] = {"onset": a["onset"], "structural_convergence": a["converge"], "gap": gap,
                                          "pass": bool(gap <= s.coincide_iters)}
            elif a is not None:
                u62[f"a k{k} s{seed}"] = {"onset": None, "structural_convergence": a["converge"], "pass": None}
            if a is not None and b is not None:
                oa, ob = a["onset"], b["onset"]
                u72[f"k{k} s{seed}"] = {"onset_a": oa, "onset_b": ob,
                                        "pass": None if oa is None and ob is None else bool(never(ob, b["total"]) <= never(oa, a["total"]))}
                ta, tb = a["t_high"], b["t_high"]
                u89a[f"k{k} s{seed}"] = {"t_high_a": ta, "t_high_b": tb,
                                         "pass": None if ta is None and tb is None else bool(never(tb, b["total"]) <= never(ta, a["total"]))}
    onset_op = (f"onset = first step where the {s.smooth}-record moving median of log₂E_f is {s.onset_drop_bits} bit below "
                "the median of the first 10 records ('never' counts as later than any step)")
    high_op = f"the first window end after which r(E_f, upper) and r(E_f, lower) both stay ≥ {s.r_high} ({s.window}-record windows)"
    claims = [
        make_claim("C6.1", "Fig. 6", "For model a, the fitting error starts to fall later as k grows.",
                   f"{onset_op}; Spearman ρ(k, onset) ≥ {s.rank_threshold} for model a, k = {depths}.", "trend", u61),
        make_claim("C6.2", "Fig. 6", "That onset coincides with the point where the structural error converges.",
                   f"|onset − structural convergence| ≤ {s.coincide_iters} iterations; convergence = first step after which "
                   f"|G − G_final| < {s.converge_tol_bits} bit (G_final: median of the last 50 records).", "trend", u62),
        make_claim("C6.3", "Fig. 6", "As k increases, U, L and G of model a approach 0.",
                   f"Spearman ρ(k, median over the run of |U|, |L|, G) ≤ −{s.rank_threshold}.", "trend", u63),
        make_claim("C7.1", "Fig. 7", "At the start of training model b's U, L and G do not fall as k grows (unlike model a).",
                   f"Spearman ρ(k, G at the first record) > −{s.rank_threshold} for model b.", "trend", u71),
        make_claim("C7.2", "Fig. 7", "Skip connections speed up convergence.",
                   f"{onset_op}; onset(b, k) ≤ onset(a, k) at every k, and onset(b, ·) spans ≤ 20 % of the run.", "trend", u72),
        make_claim("C8/9.1", "Figs 8, 9", "Model b reaches high local correlation earlier than model a.",
                   f"{high_op}: t(b, k) ≤ t(a, k) at every k.", "trend", u89a, note=_DEGENERATE),
        make_claim("C8/9.2", "Figs 8, 9", "For model a, high local correlation comes later as k grows.",
                   f"{high_op}; Spearman ρ(k, t(a, k)) ≥ {s.rank_threshold}.", "trend", u89b, note=_DEGENERATE),
    ]
    return claims


def _bullets(claims: list[Claim]) -> list[Claim]:
    """Sec. 5.3.2's summary bullets, each the conjunction of the figure claims it rests on."""
    by_id = {c.id: c for c in claims}
    out = []
    for cid, statement, parts in (
        ("S5.3.2-1", "Without skip connections, more parameters prolong the convergence of the structural error and delay the fall of the fitting error.", ["C6.1", "C6.2"]),
        ("S5.3.2-2", "Without skip connections, more parameters progressively satisfy the GIC: U, L, G → 0.", ["C5.1", "C6.3"]),
        ("S5.3.2-3", "Skip connections break the initial GIC but speed up the convergence of the structural error.", ["C7.1", "C7.2"]),
    ):
        present = [by_id[p] for p in parts if p in by_id]
        verdicts = [c.verdict for c in present]
        verdict = ("fails" if "fails" in verdicts else "holds" if verdicts and all(v == "holds" for v in verdicts) else "inconclusive")
        out.append(make_claim(cid, "Sec. 5.3.2", statement, f"the conjunction of {', '.join(parts)}: fails if any fails, holds if all hold.",
                              "trend", {c.id: {"verdict": c.verdict} for c in present}, verdict=verdict))
    return out


def training_claims(rep: Reproduction, config: ReproduceConfig) -> list[Claim]:
    claims = _fig2_claims(rep, config) + _fig5_claims(rep, config) + _depth_claims(rep, config)
    return claims + _bullets(claims)
