"""Command line: mpsearch search | compare | export | verify | show | worker.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 internal error,
130 interrupted (after writing what was computed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from .errors import MPSearchError, MPSearchWarning

EXAMPLES = {
    "search": "example: mpsearch search --model digits --strategy pso --max-evals 200 --avg-bits 4 --seed 0 --out runs/demo",
    "compare": "example: mpsearch compare --model digits --strategies greedy,pso,bayes,random --seeds 3 --max-evals 100 --avg-bits 3 --out runs/cmp",
    "export": "example: mpsearch export runs/demo/plan.json --format gptqmodel --out runs/demo/quantize_config.json",
    "verify": "example: mpsearch verify runs/demo/plan.json --model digits --json",
    "show": "example: mpsearch show runs/demo/plan.json",
    "worker": "example: mpsearch worker --storage postgresql://user@host/db --study digits-pso-seed0",
}


class UsageError(MPSearchError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        raise UsageError(f"{self.prog}: {message}")


def _number(kind: type, ok, what: str):
    """An argparse type: ``kind`` parsed from the text, refused unless ``ok``, the message saying ``what``."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    return parse


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive finite number")
_share = _number(float, lambda v: 0.0 <= v <= 1.0, "a number between 0 and 1")


def _options(pairs: list[str] | None) -> dict:
    """--option key=value, values parsed as JSON when they parse (numbers, booleans, lists)."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise UsageError(f"--option expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def build_parser() -> Parser:
    p = Parser(prog="mpsearch", description="Search per-layer bit-widths for a PyTorch model.")
    sub = p.add_subparsers(dest="command", parser_class=Parser)

    def common_search(sp):
        sp.add_argument("--model", default="digits", help="built-in task (digits, minilm, speech, video), hf:DIR (a local Hugging Face "
                        "causal LM), module:function or file.py:function")
        sp.add_argument("--search-space", help="search space YAML (path or name in search_spaces/)")
        sp.add_argument("--max-evals", type=_positive_int, default=200, help="evaluations per run (default 200)")
        sp.add_argument("--wall-time", type=_positive_float, help="stop each run after this many seconds")
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--budget-mb", type=_positive_float, help="size budget in MB (10^6 bytes)")
        g.add_argument("--avg-bits", type=_positive_float, help="size budget in average weight bits")
        sp.add_argument("--out", help="output directory (required)")
        sp.add_argument("--storage", help="Optuna storage URL (default: sqlite file in --out)")
        sp.add_argument("--fresh", action="store_true", help="discard stored trials and start over")
        sp.add_argument("--option", action="append", metavar="KEY=VALUE", help="strategy option, repeatable")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("--text", help="calibration text file for an hf:DIR model (default: sentences shipped with mpsearch)")
        sp.add_argument("--device", default="cpu", help="where the model runs: cpu (default) or cuda[:N]")
        sp.add_argument("--threads", type=_positive_int,
                        help="torch intra-op threads (default: OMP_NUM_THREADS, else the cores free now)")
        sp.add_argument("--cache-mb", type=_positive_float,
                        help="memory for quantized weights (default: half the searched weights, >= 1 GB)")
        sp.add_argument("--max-failures", type=_share, default=0.5,
                        help="stop once more than this share of evaluations failed (default 0.5)")

    s = sub.add_parser("search", help="search one strategy, write the front and the best plan", epilog=EXAMPLES["search"])
    common_search(s)
    s.add_argument("--strategy", default="pso", help="greedy, pso, bayes, ilp, random, uniform, exhaustive")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--study", help="study name in the storage (default: derived from the command)")
    s.add_argument("--workers", type=int, default=0, help="local worker processes that evaluate in parallel")
    s.add_argument("--help-options", action="store_true", help="list the strategy's options and exit")

    c = sub.add_parser("compare", help="several strategies x seeds at equal budgets on one evaluator", epilog=EXAMPLES["compare"])
    common_search(c)
    c.add_argument("--strategies", default="greedy,pso,bayes,random", help="comma-separated strategy names")
    c.add_argument("--seeds", type=_positive_int, default=3, help="seeds 0..N-1 per strategy")

    e = sub.add_parser("export", help="write a plan for a deployment tool", epilog=EXAMPLES["export"])
    e.add_argument("plan")
    e.add_argument("--format", required=True, help="torchao, onnxruntime, llama-cpp, gptqmodel, csv, markdown")
    e.add_argument("--out", required=True)
    e.add_argument("--model", help="task the plan was made for (default: the plan's model name)")
    e.add_argument("--text", help="calibration text file of an hf:DIR model (as given to search)")
    e.add_argument("--gguf", help="gguf: the model's float32 GGUF (llama.cpp's convert_hf_to_gguf.py --outtype f32)")

    v = sub.add_parser("verify", help="apply a plan and measure size and validation quality", epilog=EXAMPLES["verify"])
    v.add_argument("plan")
    v.add_argument("--model", help="task the plan was made for (default: the plan's model name)")
    v.add_argument("--text", help="calibration text file of an hf:DIR model (as given to search)")
    v.add_argument("--runtime", default="pytorch", choices=["pytorch", "onnxruntime", "torchao", "llama-cpp"],
                   help="where to measure: pytorch (mpsearch's own arithmetic, the default), or inside a deployment "
                        "runtime: onnxruntime, torchao, llama-cpp (with --gguf)")
    v.add_argument("--gguf", help="llama-cpp: the GGUF to run (written by export --format gguf)")
    v.add_argument("--json", action="store_true", help="print one JSON object")

    sh = sub.add_parser("show", help="print a plan's per-layer table", epilog=EXAMPLES["show"])
    sh.add_argument("plan")

    w = sub.add_parser("worker", help="evaluate trials queued in a shared study", epilog=EXAMPLES["worker"])
    w.add_argument("--storage", required=True)
    w.add_argument("--study", required=True)
    return p


# ---- helpers --------------------------------------------------------------------------------
def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _writable_dir(path: str | None) -> Path:
    if not path:
        raise UsageError("--out DIR is required")
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".mpsearch-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise MPSearchError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None
    return out


def _storage_url(args, out: Path) -> str:
    return args.storage or f"sqlite:///{(out / 'trials.db').resolve()}"


def _budget_tag(budget) -> str:
    if budget is None:
        return "front"
    if budget.max_avg_bits is not None:
        return f"bits{budget.max_avg_bits:g}"
    return f"bytes{budget.max_bytes}"


def _study_name(model: str, strategy: str, seed: int, budget) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).stem if model.endswith(".py") else model)
    return f"{name}-{strategy}-seed{seed}-{_budget_tag(budget)}"


# ---- commands -------------------------------------------------------------------------------
def _budget(args):
    from .core.budget import Budget

    return Budget.from_args(args.budget_mb, args.avg_bits)


def _evaluator_options(args) -> dict:
    from .device import resolve_device

    resolve_device(args.device)  # a device that does not exist fails before the model loads
    return {"device": args.device, "threads": args.threads or "auto", "cache_mb": args.cache_mb}


def cmd_search(args) -> int:
    from .pipeline import optimize
    from .report import write_run
    from .strategies import describe_options, get_strategy

    if args.help_options:
        _say(describe_options(args.strategy))
        return 0
    out = _writable_dir(args.out)
    options = _options(args.option)
    if args.workers and args.workers > 1 and args.strategy == "bayes":
        options.setdefault("batch_size", args.workers)  # TPE constant liar: one candidate per worker
    strategy = get_strategy(args.strategy, **options)  # bad options fail before the model loads
    evaluator_options = _evaluator_options(args)
    budget = _budget(args)
    url = _storage_url(args, out)
    study = args.study or _study_name(args.model, args.strategy, args.seed, budget)

    from .report import fmt_metric

    def header(evaluator, budget):
        _say(f"mpsearch: {evaluator.task.name}: {evaluator.space.summary()}; full precision "
             f"{evaluator.full_precision_bytes / 1e6:.4g} MB, {evaluator.metric_name} {fmt_metric(evaluator.reference_metric)}")
        _say(f"mpsearch: device {evaluator.device}, {evaluator.threads} thread(s) ({evaluator.threads_source})")
        _say(f"mpsearch: {args.strategy}, seed {args.seed}, {args.max_evals} evaluations"
             + (f", budget {budget.describe()}" if budget else ", no budget (whole front)") + f"; trials in {url} [{study}]")

    with run_lock(out), warnings.catch_warnings():
        warnings.simplefilter("ignore", MPSearchWarning)  # printed below, once, with the results
        res = optimize(args.model, space=args.search_space, strategy=strategy, budget=budget, max_evals=args.max_evals,
                       wall_s=args.wall_time, max_failures=args.max_failures, seed=args.seed, storage=url, study=study,
                       fresh=args.fresh, progress=not args.no_progress, workers=args.workers, on_start=header,
                       evaluator_options=evaluator_options, text=args.text)
        r = res.search
        if r.n_resumed:
            _say(f"mpsearch: resumed {r.n_resumed} stored evaluations, computed {r.n_evals - r.n_resumed} new")
        if budget is not None and res.chosen is None:
            _say(f"mpsearch: no evaluated candidate met the budget {budget.describe()}; trials are in {out / 'trials.csv'}")
        summary = write_run(res, out, summary_extra={"max_evals": args.max_evals,
                                                     "storage": url if not args.storage else "(user storage)"})
    _final_report(summary, out, res.plan())
    for w in res.warnings:
        print(f"mpsearch: warning: {w}", file=sys.stderr)
    if r.stop_reason == "too many failed evaluations":
        print(f"mpsearch: error: the search stopped: {r.n_failed} of {r.n_evals} evaluations failed (more than "
              f"{args.max_failures:.0%}); the first: {r.first_error}", file=sys.stderr)
        return 1
    return 130 if r.stop_reason == "interrupted" else 0


@contextmanager
def run_lock(out: Path):
    """One search at a time per run directory: a second one is refused instead of sharing the study."""
    import fcntl

    lock = open(out / ".mpsearch.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise MPSearchError(f"another mpsearch search ({holder}) is writing to {out}; wait for it or use another --out")
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _final_report(s: dict, out: Path, plan) -> None:
    from .report import fmt_metric

    fp = s["full_precision_bytes"]
    _say("")
    _say(f"{s['model']}: {s['n_evals']} evaluations by {s['strategy']} in {s['wall_s']:.1f} s ({s['stop_reason']}); "
         f"front of {s['front_size']} points, hypervolume {s['hypervolume']:.4f}")
    b = s.get("best")
    if b:
        name = s["metric_name"]
        rows = [("full precision", fp, 32.0, s["reference_metric"], s["reference_validation_metric"]),
                (f"plan ({b['point']})", b["size_bytes"], b["avg_bits"], b["metric"], b["validation_metric"])]
        u = s.get("uniform_at_same_size")
        if u:
            rows.append((f"uniform {u['choice']}", u["size_bytes"], u["avg_bits"], u["metric"], u["validation_metric"]))
        _say(f"  {'':<28}{'size MB':>10}{'avg bits':>10}{'ratio':>8}{name + ' cal':>16}{name + ' val':>16}")
        for label, size, bits, m, v in rows:
            _say(f"  {label:<28}{size / 1e6:>10.4f}{bits:>10.3f}{fp / size:>8.2f}{fmt_metric(m):>16}{fmt_metric(v):>16}")
    _say(f"plan:  {out / 'plan.json'}" if plan is not None else "plan:  (none)")
    _say(f"front: {out / 'front.csv'}, {out / 'front.png'}")
    _say(f"files: {', '.join(s['files'])} in {out}")


def cmd_compare(args) -> int:
    from .compare import run_comparison, write_comparison
    from .evaluator import Evaluator
    from .model.space_files import space_for
    from .strategies import get_strategy
    from .tasks import load_task

    out = _writable_dir(args.out)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not names:
        raise MPSearchError("--strategies is empty")
    options = _options(args.option)
    for n in names:  # unknown names and bad options fail before anything runs
        get_strategy(n, **options)
    budget = _budget(args)
    task = load_task(args.model, args.text)
    evaluator = Evaluator(task, space_for(task, args.search_space), **_evaluator_options(args))
    url = _storage_url(args, out)
    _say(f"mpsearch: compare {', '.join(names)} x {args.seeds} seeds x {args.max_evals} evaluations on {task.name}"
         + (f", budget {budget.describe()}" if budget else "")
         + f"; device {evaluator.device}, {evaluator.threads} thread(s) ({evaluator.threads_source})")
    with run_lock(out):  # one writer per run directory, as for search
        results = run_comparison(evaluator, names, list(range(args.seeds)), max_evals=args.max_evals,
                                 wall_s=args.wall_time, max_failures=args.max_failures, budget=budget, storage=url,
                                 study_prefix=_study_name(args.model, "compare", 0, budget).replace("-seed0", ""),
                                 options={n: options for n in names} if options else None,
                                 progress=not args.no_progress, fresh=args.fresh)
        title = f"{task.name}, {args.max_evals} evaluations" + (f", budget {budget.describe()}" if budget else "")
        write_comparison(results, evaluator, out, title=title)
    _say((out / "comparison.md").read_text())
    _say(f"files: comparison.csv, comparison.md, comparison.tex, hypervolume.png, fronts.png in {out}")
    return 130 if results and results[-1].search.stop_reason == "interrupted" else 0


def _load_plan_and_task(plan_path: str, model: str | None, text: str | None = None):
    from .tasks import BUILTIN, load_task
    from .plan import QuantizationPlan

    plan = QuantizationPlan.load(plan_path)
    name = model or plan.model.get("name")
    if model is None and name not in BUILTIN:
        raise MPSearchError(f"plan is for model {name!r}, which is not built in: pass --model module:function")
    return plan, load_task(name, text)


def cmd_export(args) -> int:
    from .exporters import REGISTRY, _load_all, export
    from .plan import QuantizationPlan

    _load_all()
    if args.format not in REGISTRY:
        raise MPSearchError(f"unknown export format {args.format!r}; choose one of {', '.join(sorted(REGISTRY))}")
    plan = QuantizationPlan.load(args.plan)
    task = None
    if REGISTRY[args.format].needs_model:
        plan, task = _load_plan_and_task(args.plan, args.model, args.text)
    res = export(plan, args.format, args.out, task, plan_path=args.plan, options={"base_gguf": args.gguf})
    _say(f"wrote {', '.join(str(p) for p in res.paths)} ({res.size_bytes:,} bytes on disk; "
         f"plan predicts {plan.predicted['size_bytes']:,} bytes)")
    for n in res.notes:
        _say(f"note: {n}")
    return 0


def cmd_verify(args) -> int:
    from .plan import verify
    from .report import fmt_metric

    plan, task = _load_plan_and_task(args.plan, args.model, args.text)
    if args.runtime != "pytorch":
        return _verify_runtime(plan, task, args)
    if args.gguf is not None:
        raise MPSearchError("--gguf is for --runtime llama-cpp")
    r = verify(plan, task)
    if args.json:
        print(json.dumps(r))
        return 0
    _say(f"{r['model']}: plan applied and measured on the validation split")
    _say(f"  {'':<12}{'measured':>14}{'predicted':>14}")
    _say(f"  {'size bytes':<12}{r['size_bytes']:>14,}{r['predicted_size_bytes']:>14,}")
    _say(f"  {r['metric_name']:<12}{fmt_metric(r['metric']):>14}{fmt_metric(r['predicted_metric']):>14}")
    _say(f"  full precision {r['metric_name']} {fmt_metric(r['reference_metric'])}; average bits {r['avg_bits']:.3f}")
    return 0


def _verify_runtime(plan, task, args) -> int:
    from .exporters.runtimes import verify_runtime
    from .report import fmt_metric

    r = verify_runtime(plan, task, args.runtime, args.gguf)
    if args.json:
        print(json.dumps(r))
        return 0
    _say(f"{r['model']}: plan run in {r['runtime']} on the validation split ({r['runtime_s']:.1f} s)")
    _say(f"  {'':<12}{'measured':>14}{'predicted':>14}")
    if r["size_bytes"] is not None:
        _say(f"  {'size bytes':<12}{r['size_bytes']:>14,}{r['predicted_size_bytes']:>14,}")
        _say(f"  {'avg bits':<12}{r['avg_bits']:>14.4f}{r['predicted_avg_bits']:>14.4f}")
    _say(f"  {r['metric_name']:<12}{fmt_metric(r['metric']):>14}{fmt_metric(r['predicted_metric']):>14}")
    diff = r["difference"]
    _say(f"  measured - predicted {r['metric_name']}: {'n/a' if diff is None else f'{diff:+.2e}'}; full precision "
         f"{fmt_metric(r['reference_metric'])}")
    return 0


def cmd_show(args) -> int:
    from .plan import QuantizationPlan, layer_table
    from .report import fmt_metric

    plan = QuantizationPlan.load(args.plan)
    p = plan.predicted
    ggml = plan.quantizer.get("format") == "ggml"
    _say(f"plan for {plan.model.get('name')} ({plan.model.get('fingerprint', '')[:19]}…), quantizer "
         + ("ggml (llama.cpp's GGML types)" if ggml else
            f"{plan.quantizer.get('scheme', 'symmetric')} {plan.quantizer.get('granularity', 'per-channel')}"))
    _say(f"predicted: {p['size_bytes']:,} bytes, {fmt_metric(p.get('avg_bits'), 3)} avg bits, "
         f"{p['metric_name']} {fmt_metric(p['metric'])}"
         + (f" (validation {fmt_metric(p['validation_metric'])})" if "validation_metric" in p else ""))
    rows = layer_table(plan)
    w = max([len(r["layer"]) for r in rows] + [5])
    _say(f"{'layer':<{w}}  {'kind':<9}{'params':>12}{'type' if ggml else 'bits':>8}{'bytes':>12}{'share':>8}")
    for r in rows:
        _say(f"{r['layer']:<{w}}  {r['kind']:<9}{r['params']:>12,}{r['setting'] if ggml else r['bits']:>8}{r['bytes']:>12,}"
             f"{r['bytes'] / max(p['size_bytes'], 1):>8.1%}")
    _say(f"{len(plan.unquantized)} tensors left unquantized")
    return 0


def cmd_worker(args) -> int:
    from .workers import run_worker

    return run_worker(args.storage, args.study)


COMMANDS = {"search": cmd_search, "compare": cmd_compare, "export": cmd_export, "verify": cmd_verify,
            "show": cmd_show, "worker": cmd_worker}


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """mpsearch's own warnings as one line; everyone else's as Python prints them."""
    if issubclass(category, MPSearchWarning):
        print(f"mpsearch: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    warnings.showwarning = _show_warning
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except MPSearchError as exc:
        print(f"mpsearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpsearch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug of ours: one line, the traceback only on request
        if os.environ.get("MPSEARCH_DEBUG"):
            raise
        print(f"mpsearch: internal error: {type(exc).__name__}: {exc} (set MPSEARCH_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
