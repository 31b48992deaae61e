"""`prescient ...`: the command line.

`prescient simulate` with no arguments compares every baseline on the bundled Azure
conversation trace; a scenario file (`--scenario`) fixes an experiment, and flags override it.
`prescient profile` measures a simulated engine's TTFT/TPOT profiles for SLO-aware scheduling.
The live services (`scheduler`, `discovery-agent`, ...) live in their own packages, each with a
`cli` module (`add_parser`, `run`) registered in `SERVICES`. This module and the services' `run`
(handed `os.environ`) are the only readers of the environment. Bad input exits with status 2 and
one line naming the flag, key, or file line at fault.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from prescient import __version__, profiling
from prescient.config.presets import get_preset, preset_names
from prescient.config.scheduler import (
    load_scheduler_settings,
    scheduler_parser,
)
from prescient.config.settings import new_parser
from prescient.errors import ConfigError, PrescientError
from prescient.predict.output_length import make_output_predictor
from prescient.sim import experiment
from prescient.sim.metrics import summary_to_json
from prescient.sim.report import render_table, write_results
from prescient.sim.scenario import Scenario, load_scenario, scenario_from_dict
from prescient.sim.workload import parse_length_spec


def _simulate_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "simulate", help="replay a workload through policies on a simulated cluster",
        epilog="Every `prescient scheduler` flag (e.g. --enable-full-mode-scheduling=false, "
               "--dispatch-neutral-load-metric num_waiting_requests, "
               "--cms-pull-status-interval-ms 100) also applies to the simulated policies.")
    p.add_argument("--scenario", type=Path, help="YAML or TOML scenario file (flags override it)")
    p.add_argument("--policy", help="comma-separated policies to compare (default: all baselines)")
    p.add_argument("--trace", help="bundled trace name (azure-conv, azure-code) or a file path")
    p.add_argument("--workload", choices=("trace", "synthetic", "sessions"))
    p.add_argument("--rate", type=float, help="synthetic arrival rate, requests/s")
    p.add_argument("--arrival", choices=("poisson", "gamma"), help="synthetic arrival process")
    p.add_argument("--cv", type=float, help="gamma inter-arrival coefficient of variation")
    p.add_argument(
        "--prompt-len", help="synthetic prompt lengths, e.g. lognormal:mean=1155,median=1020"
    )
    p.add_argument("--output-len", help="synthetic output lengths, e.g. uniform:50:400")
    p.add_argument("--rate-scale", type=float, help="compress time by this factor (default 20)")
    p.add_argument("--duration", type=float, help="keep arrivals in the first N seconds")
    p.add_argument("--num-requests", type=int, help="keep the first N requests")
    p.add_argument("--warmup", type=float, help="seconds excluded from statistics at the start")
    p.add_argument("--cooldown", type=float, help="seconds excluded from statistics at the end")
    p.add_argument("--instances", type=int, help="number of instances (default 8)")
    p.add_argument("--preset", help="engine preset, or groups: llama3-8b-h100:4,llama3-8b-a100:4")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--engine-batching", choices=("vllm", "lens"),
                   help="engines' token budget per step: vLLM's fixed one, or NexusSched's LENS")
    p.add_argument("--queue-policy", choices=("fcfs", "spf"),
                   help="engines' waiting order: arrival, or shortest predicted output first")
    p.add_argument("--output-length-predictor",
                   help="none, oracle, lognormal:sigma=S or histogram (default none)")
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--ttft-slo", type=float, help="TTFT SLO in ms (default 6000)")
    p.add_argument("--tpot-slo", type=float, help="TPOT SLO in ms (default 50)")
    p.add_argument("--status-push-interval-ms", type=float)
    p.add_argument("--goodput", action="store_true",
                   help="also search each policy's goodput (many runs)")
    p.add_argument("--out", type=Path, help="write results.json, per-request CSVs and plots here")
    p.add_argument("--summary-json", action="store_true",
                   help="print the deterministic summary JSON instead of the table")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list-presets", action="store_true", help="list engine presets and exit")


# Live services: each module has `add_parser(sub)` and `run(args, env) -> int`.
SERVICES = ("prescient.gateway.cli", "prescient.scheduler.cli", "prescient.simengine.cli",
            "prescient.discovery.cli", "prescient.serve", "prescient.llumlet.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prescient", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"prescient {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    _profile_parser(sub)
    for name in SERVICES:
        module = importlib.import_module(name)
        before = set(sub.choices)
        module.add_parser(sub)
        for command in set(sub.choices) - before:
            sub.choices[command].set_defaults(service_run=module.run)
    return parser


def _profile_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "profile", help="measure TTFT/TPOT profiles of a simulated engine (for SLO scheduling)",
        description="Drive a simulated engine and write ttft.json and tpot.json in upstream "
                    "Llumnix's profiling formats (values in ms).")
    p.add_argument("--preset", default="llama3-8b-h100", help="engine preset")
    p.add_argument("--out-dir", type=Path, required=True, help="write ttft.json and tpot.json here")
    p.add_argument("--tokens", help="TTFT prompt lengths, e.g. 128,256,1024 "
                                    "(default: 16..max-num-batched-tokens)")
    p.add_argument("--batch-sizes", help="TPOT batch sizes (default: 1,2,4,...,256)")
    p.add_argument("--tokens-per-request", help="TPOT context tokens per request "
                                                "(default: 8,16,... as far as the KV cache holds)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="the engine's chunk budget per step")
    p.add_argument("--repeats", type=int, default=5, help="samples per grid point")
    p.add_argument("--seed", type=int, default=0)


def _set(data: dict[str, Any], path: str, value: object) -> None:
    if value is None:
        return
    *parents, leaf = path.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


def _groups(text: str) -> list[dict[str, object]] | None:
    if ":" not in text:
        return None
    groups: list[dict[str, object]] = []
    for part in text.split(","):
        name, _, count = part.partition(":")
        if not count.isdigit():
            raise ConfigError(f"--preset: expected NAME:COUNT, got {part!r}")
        groups.append({"preset": name, "count": int(count)})
    return groups


_SYNTHETIC_FLAGS = ("rate", "arrival", "cv", "prompt_len", "output_len")


def build_scenario(args: argparse.Namespace) -> Scenario:
    """The scenario file (or the defaults) with every given flag applied on top.

    Without a scenario file, choosing a workload (`--trace`, `--workload`, or any synthetic
    flag) replays it at its own rate unless `--rate-scale` says otherwise; the x20 belongs to
    the built-in default run only.
    """
    base = load_scenario(args.scenario) if args.scenario else Scenario()
    data: dict[str, Any] = msgspec.to_builtins(base)
    if args.policy is not None:
        data["policies"] = [p.strip() for p in args.policy.split(",") if p.strip()]
    synthetic = any(getattr(args, f) is not None for f in _SYNTHETIC_FLAGS)
    kind = args.workload or ("trace" if args.trace else "synthetic" if synthetic else None)
    if kind is not None and args.scenario is None and args.rate_scale is None:
        _set(data, "workload.rate_scale", 1.0)
    _set(data, "workload.kind", kind)
    for flag in ("prompt_len", "output_len"):
        spec = getattr(args, flag)
        if spec is not None:
            parse_length_spec(spec)  # fail early, naming the bad text
            _set(data, f"workload.synthetic.{flag.split('_')[0]}", spec)
    sized = args.num_requests is not None or args.duration is not None
    if sized and data["workload"]["kind"] == "synthetic":  # size the generator, not the cut
        _set(data, "workload.synthetic.num_requests", args.num_requests or 10**9)
        _set(data, "workload.synthetic.duration_s", args.duration)
    if args.preset is not None:
        groups = _groups(args.preset)
        if groups is None:
            _set(data, "cluster.preset", args.preset)
            data["cluster"]["groups"] = []
        else:
            _set(data, "cluster.groups", groups)
    for path, value in (
        ("workload.trace", args.trace),
        ("workload.synthetic.rate", args.rate), ("workload.synthetic.arrival", args.arrival),
        ("workload.synthetic.cv", args.cv), ("workload.rate_scale", args.rate_scale),
        ("workload.duration_s", args.duration), ("workload.num_requests", args.num_requests),
        ("workload.warmup_s", args.warmup), ("workload.cooldown_s", args.cooldown),
        ("cluster.instances", args.instances), ("cluster.max_num_seqs", args.max_num_seqs),
        ("cluster.queue_policy", args.queue_policy), ("cluster.batching", args.engine_batching),
        ("output_length_predictor", args.output_length_predictor),
        ("cluster.max_num_batched_tokens", args.max_num_batched_tokens), ("seed", args.seed),
        ("slo.ttft_ms", args.ttft_slo), ("slo.tpot_ms", args.tpot_slo),
        ("observation.status_push_interval_ms", args.status_push_interval_ms),
    ):
        _set(data, path, value)
    _engine_env(data, os.environ)
    _apply_scheduler_flags(data, args)
    scenario = scenario_from_dict(data, str(args.scenario or "command line"))
    _validate(scenario)
    return scenario


def _apply_scheduler_flags(data: dict[str, Any], args: argparse.Namespace) -> None:
    """Scheduler settings from simulate's shared flags, then any `prescient scheduler` flag."""
    # One flag, one meaning: the SLO targets and the chunk budget are the scheduler's too.
    for key, value in (("ttft_slo", args.ttft_slo), ("tpot_slo", args.tpot_slo),
                       ("max_num_batched_tokens", args.max_num_batched_tokens)):
        _set(data, f"scheduler.{key}", value)
    if not args.scheduler_flags:
        return
    load_scheduler_settings(args.scheduler_flags, {})  # a bad value is named by its flag
    given = vars(scheduler_parser(new_parser()).parse_args(args.scheduler_flags))
    for own in ("config", "extra_args", "print_config"):
        if given.pop(own, None) is not None:
            raise ConfigError(f"--{own.replace('_', '-')} belongs to `prescient scheduler`; "
                              "for simulate, use a scenario file's scheduler: section")
    data["scheduler"].update(given)


def _engine_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """The engine-side environment variables the simulated engines honour."""
    if "LLUMNIX_ENABLE_PROFILING" in env:
        value = env["LLUMNIX_ENABLE_PROFILING"].strip().lower()
        if value not in ("0", "1", "true", "false"):
            raise ConfigError(f"LLUMNIX_ENABLE_PROFILING must be 0 or 1, got {value!r}")
        _set(data, "cluster.enable_profiling", value in ("1", "true"))
    for name, key in (("LLUMNIX_PROFILING_STEPS", "cluster.profiling_steps"),
                      ("LLUMNIX_MAX_REQ_MIG_IN", "migration.max_req_mig_in"),
                      ("LLUMNIX_MAX_REQ_MIG_OUT", "migration.max_req_mig_out")):
        if name in env:
            value = env[name].strip()
            if not value.isdigit():
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
            _set(data, key, int(value))


def _validate(s: Scenario) -> None:
    experiment.check_policies(s.policies)
    make_output_predictor(s.output_length_predictor, random.Random(0))  # names the bad spec
    for group in s.cluster.groups or ():
        get_preset(group.preset)
    if not s.cluster.groups:
        get_preset(s.cluster.preset)
    if s.workload.rate_scale <= 0:
        raise ConfigError(f"--rate-scale must be > 0, got {s.workload.rate_scale}")
    if s.cluster.instances < 1:
        raise ConfigError(f"--instances must be >= 1, got {s.cluster.instances}")
    w, o = s.workload, s.observation
    for flag, value in (("--warmup", w.warmup_s), ("--cooldown", w.cooldown_s)):
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    for flag, value in (("--status-push-interval-ms", o.status_push_interval_ms),
                        ("observation.load_sample_interval_ms", o.load_sample_interval_ms)):
        if value <= 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")


def _progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), console=console, transient=True, disable=not enabled,
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # pipes and files get the whole table, not 80 columns
    if args.list_presets:
        for name in preset_names():
            console.print(f"{name:24} {get_preset(name).source}")
        return 0
    scenario = build_scenario(args)
    base = experiment.base_requests(scenario)
    requests = experiment.shape_requests(base, scenario, scenario.workload.rate_scale)
    horizon = max(r.arrival_time for r in requests) or 1.0
    show = not args.no_progress and not args.summary_json and console.is_terminal
    results, summaries, wall = [], [], {}
    with _progress_bar(console, show) as bar:
        for policy in scenario.policies:
            task = bar.add_task(policy, total=horizon)
            started = time.perf_counter()
            result = experiment.run_policy(
                scenario, requests, policy, lambda now, t=task: bar.update(t, completed=now))
            wall[policy] = time.perf_counter() - started
            bar.update(task, completed=horizon)
            results.append(result)
            summaries.append(experiment.summarize_result(result, scenario))
    if args.summary_json:
        sys.stdout.buffer.write(summary_to_json(summaries) + b"\n")
    else:
        _print_report(console, scenario, requests, results, summaries, wall)
    if args.summary_json:
        console = Console(stderr=True)  # stdout carries the JSON alone
    if args.goodput:
        for policy in scenario.policies:
            g = experiment.goodput(scenario, base, policy)
            console.print(f"goodput {policy:16} rate scale {g:.2f} (>= 90% SLO attainment)")
    if args.out:
        paths = write_results(
            args.out, summaries=summaries,
            records_by_policy={r.policy: r.records for r in results},
            load_by_policy={r.policy: r.load for r in results},
            scenario=msgspec.to_builtins(scenario),
        )
        console.print(f"wrote {len(paths)} files to {args.out}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    preset = get_preset(args.preset)
    max_batched = args.max_num_batched_tokens
    if max_batched < 1:
        raise ConfigError(f"--max-num-batched-tokens must be >= 1, got {max_batched}")
    tokens, batches, tprs = profiling.default_grids(preset, max_batched)
    if args.tokens is not None:
        tokens = profiling.parse_grid("--tokens", args.tokens)
    if args.batch_sizes is not None:
        batches = profiling.parse_grid("--batch-sizes", args.batch_sizes)
    if args.tokens_per_request is not None:
        tprs = profiling.parse_grid("--tokens-per-request", args.tokens_per_request)
    ttft, tpot = profiling.profile_engine(
        args.preset, tokens_grid=tokens, batch_grid=batches, tpr_grid=tprs,
        max_num_batched_tokens=max_batched, repeats=args.repeats, seed=args.seed)
    paths = profiling.write_profiles(args.out_dir, ttft, tpot)
    t50 = [r["p50"] for r in ttft["results"]]  # type: ignore[attr-defined]
    d50 = [r["p50"] for r in tpot["results"]]  # type: ignore[attr-defined]
    print(f"{args.preset}, max_num_batched_tokens {max_batched}, {args.repeats} repeats")
    print(f"TTFT: {len(tokens)} prompt lengths {tokens[0]}..{tokens[-1]} tokens: "
          f"p50 {min(t50):.1f}..{max(t50):.1f} ms")
    print(f"TPOT: {len(batches)} batch sizes {batches[0]}..{batches[-1]} x {len(tprs)} "
          f"tokens per request {tprs[0]}..{tprs[-1]}: p50 {min(d50):.2f}..{max(d50):.2f} ms")
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


_COMMANDS = {"simulate": cmd_simulate, "profile": cmd_profile}


def _print_report(console: Console, scenario: Scenario, requests: Sequence[object],
                  results: Sequence[experiment.SimResult], summaries: Sequence[object],
                  wall: dict[str, float]) -> None:
    c, w = scenario.cluster, scenario.workload
    groups = [(g.count, g.preset) for g in c.groups] or [(c.instances, c.preset)]
    cluster = ", ".join(f"{n} x {preset}" for n, preset in groups)
    source = w.trace if w.kind == "trace" else w.kind
    console.print(f"[bold]prescient simulate[/]: {len(requests)} requests ({source}, rate x"
                  f"{w.rate_scale:g}) on {cluster}; status poll "
                  f"{scenario.scheduler.cms_pull_status_interval_ms:g} ms")
    render_table(summaries, slo=experiment.slo_spec(scenario), console=console)  # type: ignore[arg-type]
    speed = ", ".join(f"{r.policy} {r.sim_time_s / max(wall[r.policy], 1e-9):.0f}x"
                      for r in results)
    console.print(f"simulated {results[0].sim_time_s:.0f} s; speed vs real time: {speed}")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """`prescient ...`; `env` (default `os.environ`) is what the live services read."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "simulate":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.scheduler_flags = extra
    try:
        service_run = getattr(args, "service_run", None)
        if service_run is not None:
            return int(service_run(args, os.environ if env is None else env))
        return _COMMANDS[args.command](args)
    except PrescientError as e:
        print(f"prescient: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
