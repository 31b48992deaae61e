"""Step-time models: upstream's quadratic predictor vs NexusSched's structural model.

Both models predict how long one engine step takes. Upstream Llumnix's `QuadraticPredictor` sees
only the prefill tokens of a step (`x`, the profiling sample: tokens of chunks longer than one
token) and fits `T = a·x² + b·x + c`; decode-only steps produce no sample, so it is trained on
steps with prefill work only and predicts a decode-only step as `T(0) = c`, whatever the decode
batch. NexusSched's `StructuralStepModel` sees `B` (requests scheduled: prefill chunks + decodes)
and `S` (tokens scheduled: chunk tokens + 1 per decode) of every step.

Data: for each preset (`llama3-8b-h100`, `llama3-8b-a100`, and `llama3-8b-a100-table`, whose
non-attention time is Vidur's measured curve) and each role, one `SimEngine`
(`EngineConfig(num_gpu_blocks=preset's)`, defaults otherwise: max_num_seqs 256,
max_num_batched_tokens 8192, prefix caching on — no prefixes are shared here), driven directly by
a Poisson synthetic workload (`synthetic_workload`, seeds 0, 1, 2; prompts lognormal mean 1,500 /
median 1,000 tokens in [16, 8,000]) at a rate that keeps it busy (`RATES`). Roles: `neutral`
(outputs lognormal mean 250 / median 150 in [2, 2,000]: mixed and decode-only steps; a loaded
engine almost never runs a prefill without decodes) and `prefill` (output 1 token, a PD prefill
instance: prefill-only steps). Every committed plan gives one sample, read from `engine._plan`
before `complete_step()`: a single step (B = chunks + decodes, S = chunk tokens + decodes,
x = tokens of chunks longer than one token, true duration `alpha`), or a run of identical
decode steps, recorded as its last step (B = S = decodes, x = 0). The first `NUM_TRAIN` samples
train, the next `NUM_TEST` are held out.

Training is online, as in the scheduler: samples arrive one at a time and every
`REFIT_EVERY` samples (a status loop) each model gets `maybe_refit()`; the models are frozen at
the end of training and scored on the held-out steps:

- `quadratic (upstream)`: `QuadraticPredictor()` defaults (20 warm-up samples, 1,000 kept,
  drift reset), fed `(x, T)` of steps with `x > 0`; predicts `T(x)`.
- `structural`: `StructuralStepModel()` defaults (20 warm-up samples, 1,000 kept, MAPE gate
  0.15 over 64, R² fallback 0.8), fed `(B, S, T)` of every step; predicts `T(B, S)`.
- `structural (CMS view)`: what the dispatcher's `StructuralBank` can learn: `(1, x, T)` of
  steps with `x > 0` (CMS samples carry no `B`); predicts `T(1, x)`.
- `structural (batch fit)`: `fit()` once on all `NUM_TRAIN` samples, for reference.

Cases: each (preset, role) alone (one model per instance) and `shared H100+A100` per role: one
model shared by an H100 and an A100 engine (training samples interleaved, A100 then H100, 1,000
each), scored on both engines' held-out steps — neither model has an instance feature, so it
can only learn the average.

Also: online adaptation to a 2x slowdown (`prequential`), the fitted parameters, and how well
`as_quadratic` (the dispatcher's replay adapter) follows each structural fit.

Reported per step class (prefill-only: chunks and no decodes; mixed: both; decode-only: no
chunks; all): MAPE (mean |pred − true| / true) and p90 of |pred − true| in ms.

Run from the repository root:

    .venv/bin/python bench/step_models.py          # the recorded numbers (~7 s)
    .venv/bin/python bench/step_models.py --quick  # smoke run: fewer samples
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from prescient.config.presets import get_preset
from prescient.engine import EngineConfig, SimEngine
from prescient.predict.quadratic import QuadraticPredictor
from prescient.predict.structural import DEFAULT_MAX_SAMPLES, RefitKind, StructuralStepModel
from prescient.sim.workload import LengthSpec, synthetic_workload

PRESETS = ("llama3-8b-h100", "llama3-8b-a100", "llama3-8b-a100-table")
ROLES = ("neutral", "prefill")
# Requests/s per (preset, role): busy but stable (~0.75 of capacity for prefill instances).
RATES = {("llama3-8b-h100", "neutral"): 9.0, ("llama3-8b-a100", "neutral"): 3.5,
         ("llama3-8b-a100-table", "neutral"): 3.5, ("llama3-8b-h100", "prefill"): 20.0,
         ("llama3-8b-a100", "prefill"): 7.0, ("llama3-8b-a100-table", "prefill"): 7.0}
PROMPT = LengthSpec.lognormal(mean=1500, median=1000, min=16, max=8000)
OUTPUTS = {"neutral": LengthSpec.lognormal(mean=250, median=150, min=2, max=2000),
           "prefill": LengthSpec.fixed(1)}  # a PD prefill instance: no decodes
NUM_TRAIN = 2000
NUM_TEST = 4000
REFIT_EVERY = 10
MAX_TOKENS = 8192  # the engines' max_num_batched_tokens: the range of as_quadratic
CLASSES = ("prefill-only", "mixed", "decode-only", "all")


@dataclass(frozen=True)
class Steps:
    """Per-step features and true durations, in commit order."""

    b: np.ndarray  # requests scheduled
    s: np.ndarray  # tokens scheduled
    x: np.ndarray  # prefill tokens of chunks longer than one token (the upstream sample)
    chunks: np.ndarray  # prefill chunks
    decodes: np.ndarray  # decodes
    t: np.ndarray  # true duration, ms

    def slice(self, lo: int, hi: int) -> Steps:
        return Steps(*(getattr(self, f)[lo:hi] for f in ("b", "s", "x", "chunks", "decodes",
                                                          "t")))

    def classes(self) -> dict[str, np.ndarray]:
        pf, dc = self.chunks > 0, self.decodes > 0
        return {"prefill-only": pf & ~dc, "mixed": pf & dc, "decode-only": ~pf,
                "all": np.ones_like(pf)}


def generate(preset_name: str, role: str, num_steps: int, seed: int = 0) -> Steps:
    """Drive one engine with the synthetic workload and record `num_steps` committed plans."""
    preset = get_preset(preset_name)
    engine = SimEngine(preset_name, EngineConfig(num_gpu_blocks=preset.num_gpu_blocks,
                                                 block_size=preset.block_size), preset.model)
    rate = RATES[preset_name, role]
    requests = synthetic_workload(rate=rate, num_requests=int(rate * 3600), prompt=PROMPT,
                                  output=OUTPUTS[role], seed=seed)
    rows: list[tuple[int, int, int, int, int, float]] = []
    i, end = 0, None
    while len(rows) < num_steps:
        arrival = requests[i].arrival_time if i < len(requests) else float("inf")
        if end is None:
            if i >= len(requests):
                break
            engine.add_request(requests[i], arrival)
            i += 1
            end = engine.start_step(arrival)
        elif arrival < end:
            engine.add_request(requests[i], arrival)
            i += 1
            end = engine.interrupt(arrival)
        else:
            plan = engine._plan  # bench-only peek at the step in flight
            assert plan is not None
            dec = engine._dec_count
            if plan.chunks:
                rows.append((len(plan.chunks) + dec, plan.prefill_tokens + dec,
                             plan.sampled_tokens, len(plan.chunks), dec, plan.alpha * 1000.0))
            else:
                last_ms = (plan.alpha + plan.beta * (plan.n - 1)) * 1000.0
                rows.append((dec, dec, 0, 0, dec, last_ms))
            engine.complete_step()
            end = engine.start_step(end)
    data = np.array(rows, dtype=np.float64)
    return Steps(*(data[:, k] for k in range(5)), t=data[:, 5])


def interleave(a: Steps, b: Steps) -> Steps:
    """Alternate the samples of two engines (a first)."""
    n = min(len(a.t), len(b.t))
    fields = ("b", "s", "x", "chunks", "decodes", "t")
    out = []
    for f in fields:
        col = np.empty(2 * n)
        col[0::2], col[1::2] = getattr(a, f)[:n], getattr(b, f)[:n]
        out.append(col)
    return Steps(*out)


Predictor = Callable[[Steps], np.ndarray]


@dataclass
class Trained:
    name: str
    predict: Predictor
    note: str  # what the online fitting did


def train_quadratic(train: Steps) -> Trained:
    model = QuadraticPredictor()
    fits = 0
    for k in range(len(train.t)):
        if train.x[k] > 0:
            model.add_sample(float(train.x[k]), float(train.t[k]))
        if (k + 1) % REFIT_EVERY == 0:
            fits += model.maybe_refit()
    fits += model.maybe_refit()
    a, b, c = model.coefficients
    note = (f"{model.fit_kind} fit, {fits} fits, {model.num_drift_resets} drift resets, "
            f"{model.num_samples} samples kept")
    return Trained("quadratic (upstream)", lambda st: a * st.x * st.x + b * st.x + c, note)


def train_structural(train: Steps, *, cms_view: bool = False, batch: bool = False) -> Trained:
    model = StructuralStepModel(max_samples=len(train.t) if batch else DEFAULT_MAX_SAMPLES)
    refits: Counter[str] = Counter()
    for k in range(len(train.t)):
        if cms_view:
            if train.x[k] > 0:
                model.add_sample(1, int(train.x[k]), float(train.t[k]))
        else:
            model.add_sample(int(train.b[k]), int(train.s[k]), float(train.t[k]))
        if not batch and (k + 1) % REFIT_EVERY == 0:
            refits[model.maybe_refit()] += 1
    if batch:
        model.fit()
    else:
        refits[model.maybe_refit()] += 1
    p = model.params
    ptxt = (f"P_max {p.p_max:.3g}, k_B {p.k_b:.3g}, k_S {p.k_s:.3g}, w1 {p.w1:.3g}, "
            f"tau_B {p.tau_b:.3g}, tau_S {p.tau_s:.3g}, R² {model.r2:.4f}" if p else "no fit")
    refit_txt = ", ".join(f"{kind} x{n}" for kind, n in sorted(refits.items())
                          if kind != RefitKind.NONE)
    quad_err = []
    for b_fixed in sorted({1, max(1, round(float(np.median(train.b))))}):
        qa, qb, qc = model.as_quadratic(b_fixed, MAX_TOKENS)
        s = np.arange(1, MAX_TOKENS + 1, dtype=np.float64)
        exact = model.predict_many(np.full_like(s, b_fixed), s)
        worst = np.abs((qa * s * s + qb * s + qc) / exact - 1).max()
        quad_err.append(f"B={b_fixed}: {100 * worst:.1f}%")
    note = (f"{model.mode}; {ptxt}; {model.num_samples} samples kept"
            + (f"; refits: {refit_txt}" if refit_txt else "")
            + f"; as_quadratic worst error over S in [1, {MAX_TOKENS}]: " + ", ".join(quad_err))
    if cms_view:
        return Trained("structural (CMS view)",
                       lambda st: model.predict_many(np.ones_like(st.x), st.x), note)
    name = "structural (batch fit)" if batch else "structural"
    return Trained(name, lambda st: model.predict_many(st.b, st.s), note)


def score(pred: np.ndarray, test: Steps) -> dict[str, tuple[float, float, int]]:
    """Per class: (MAPE, p90 |error| ms, steps)."""
    err = np.abs(pred - test.t)
    out = {}
    for name, mask in test.classes().items():
        if not np.any(mask):
            out[name] = (float("nan"), float("nan"), 0)
            continue
        out[name] = (float(np.mean(err[mask] / test.t[mask])),
                     float(np.percentile(err[mask], 90)), int(mask.sum()))
    return out


def _cells(res: dict[str, tuple[float, float, int]]) -> str:
    return " | ".join("– | –" if res[c][2] == 0 else f"{100 * res[c][0]:.1f}% | {res[c][1]:.2f}"
                      for c in CLASSES)


def prequential(stream: Steps, change_at: int, windows: Sequence[tuple[int, int]]
                ) -> dict[str, list[float]]:
    """Online MAPE after a slowdown: each status loop of `REFIT_EVERY` steps is predicted with
    the models as they stood at its start, then fed to them (quadratic: steps with x > 0).

    Returns per model the MAPE over each window `[lo, hi)` of steps counted from `change_at`.
    """
    quad, struct = QuadraticPredictor(), StructuralStepModel()
    preds = {"quadratic (upstream)": np.full(len(stream.t), np.nan),
             "structural": np.full(len(stream.t), np.nan)}
    for lo in range(0, len(stream.t), REFIT_EVERY):
        hi = min(lo + REFIT_EVERY, len(stream.t))
        part = stream.slice(lo, hi)
        if quad.fitted:
            a, b, c = quad.coefficients
            preds["quadratic (upstream)"][lo:hi] = a * part.x * part.x + b * part.x + c
        if struct.fitted:
            preds["structural"][lo:hi] = struct.predict_many(part.b, part.s)
        for k in range(lo, hi):
            if stream.x[k] > 0:
                quad.add_sample(float(stream.x[k]), float(stream.t[k]))
            struct.add_sample(int(stream.b[k]), int(stream.s[k]), float(stream.t[k]))
        quad.maybe_refit()
        struct.maybe_refit()
    out = {}
    for name, pred in preds.items():
        err = np.abs(pred - stream.t) / stream.t
        out[name] = [float(np.mean(err[change_at + lo:change_at + hi])) for lo, hi in windows]
    return out


Case = tuple[str, Steps, list[tuple[str, Steps]]]  # name, training steps, (scored on, test)


def make_cases(data: dict[tuple[str, str], Steps], num_train: int) -> list[Case]:
    cases: list[Case] = []
    for p in PRESETS:
        for r in ROLES:
            st = data[p, r]
            cases.append((f"{p} {r}", st.slice(0, num_train),
                          [("same", st.slice(num_train, len(st.t)))]))
    for r in ROLES:
        h100, a100 = data["llama3-8b-h100", r], data["llama3-8b-a100", r]
        shared = interleave(a100.slice(0, num_train // 2), h100.slice(0, num_train // 2))
        cases.append((f"shared H100+A100 {r}", shared,
                      [("H100", h100.slice(num_train, len(h100.t))),
                       ("A100", a100.slice(num_train, len(a100.t)))]))
    return cases


def evaluate(cases: list[Case]) -> tuple[list[tuple[str, str, str, dict]], list[str]]:
    """Train the four models per case; (case, scored on, model, score) rows and fit notes."""
    rows, notes = [], []
    for case, train, tests in cases:
        models = [train_quadratic(train), train_structural(train),
                  train_structural(train, cms_view=True), train_structural(train, batch=True)]
        notes += [f"- {case}, {m.name}: {m.note}" for m in models]
        for scored_on, test in tests:
            rows += [(case, scored_on, m.name, score(m.predict(test), test)) for m in models]
    return rows, notes


def print_data(data: dict[tuple[str, str], Steps], num_train: int) -> None:
    print("\n| engine | role | req/s | held-out prefill-only | mixed | decode-only | "
          "true ms p50 | p99 | max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (p, r), st in data.items():
        test = st.slice(num_train, len(st.t))
        n = {k: int(v.sum()) for k, v in test.classes().items()}
        q50, q99 = np.percentile(test.t, [50, 99])
        print(f"| {p} | {r} | {RATES[p, r]:g} | {n['prefill-only']} | {n['mixed']} | "
              f"{n['decode-only']} | {q50:.1f} | {q99:.1f} | {test.t.max():.1f} |")


def print_slowdown(data: dict[tuple[str, str], Steps], num_train: int, num_test: int) -> None:
    windows = [(-min(1000, num_train), 0), (0, 100), (100, 500), (500, num_test)]
    print(f"\nOnline adaptation to a 2x slowdown (every step after the first {num_train} of "
          "each neutral engine takes twice as long; MAPE of predictions made online, steps "
          "counted from the change):\n")
    print("| engine | model | " + " | ".join(f"steps {lo} to {hi}" for lo, hi in windows)
          + " |")
    print("|---|---|" + "---:|" * len(windows))
    for p in PRESETS:
        st = data[p, "neutral"]
        slow = Steps(st.b, st.s, st.x, st.chunks, st.decodes,
                     np.where(np.arange(len(st.t)) >= num_train, 2.0 * st.t, st.t))
        for name, mapes in prequential(slow, num_train, windows).items():
            print(f"| {p} | {name} | " + " | ".join(f"{100 * m:.1f}%" for m in mapes) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer samples")
    parser.add_argument("--seeds", default="0,1,2",
                        help="workload seeds; the first gets the full tables")
    args = parser.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",")]
    num_train, num_test = (500, 1000) if args.quick else (NUM_TRAIN, NUM_TEST)
    started = time.perf_counter()
    print(f"# step_models: {num_train} training / {num_test} held-out steps per engine; "
          f"seeds {seeds}; python {platform.python_version()}, numpy {np.__version__}")
    runs = []
    for seed in seeds:
        data = {(p, r): generate(p, r, num_train + num_test, seed)
                for p in PRESETS for r in ROLES}
        rows, notes = evaluate(make_cases(data, num_train))
        runs.append(rows)
        if seed != seeds[0]:
            continue
        print(f"\nSeed {seed}:")
        print_data(data, num_train)
        print("\n| case | scored on | model | " + " | ".join(f"{c} MAPE | {c} p90 ms"
                                                           for c in CLASSES) + " |")
        print("|---|---|---|" + "---:|---:|" * len(CLASSES))
        for case, scored_on, name, res in rows:
            print(f"| {case} | {scored_on} | {name} | {_cells(res)} |")
        print_slowdown(data, num_train, num_test)
        print("\nFits (P_max tokens/ms, k_B 1/request, k_S 1/token, w1 dimensionless, tau_B "
              "ms/request, tau_S ms/token; R² on the samples of the model's last fit):")
        print("\n".join(notes))
    if len(seeds) > 1:
        print("\nMAPE over all held-out steps, by workload seed:\n")
        print("| case | scored on | model | " + " | ".join(f"seed {s}" for s in seeds) + " |")
        print("|---|---|---|" + "---:|" * len(seeds))
        for k, (case, scored_on, name, _) in enumerate(runs[0]):
            cells = " | ".join(f"{100 * run[k][3]['all'][0]:.1f}%" for run in runs)
            print(f"| {case} | {scored_on} | {name} | {cells} |")
    print(f"\nwall {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
