"""Decode steps in one cycle's generation, counted by stage: a count, not a time (a decode step is
one decoder call that adds a token to every running row; on a GPU a step costs about the same at
4 or 150 rows). One cycle after training, as the loop runs it: the fresh batch (GENERATE, INVERT,
SCORE, --candidates sampled commands per task) and the probe (greedy, judged by the run's judge
and by the frozen base model), with the run's flags, the model untrained.

Two arrangements, the same model and seeds, one after the other (--pairs times, alternating):
  folded    the probe's tasks ride in the fresh batch's passes (what the loop does)
  separate  the probe's commands and their inversion in passes of their own (the loop before;
            the batch's execution, which decodes nothing, left out)
and whether they wrote the same texts (the batch's sampled commands and reconstructions, the
probe's greedy ones) and scores (the embedder's batches differ, so they may in the last digits).

    python bench/decode_steps.py --out output/decode_steps.json      # 1-3 minutes a pair on 2 cores
    python bench/decode_steps.py --out F.json -- --tasks 10 --probe-tasks 4   # flags after --: the main script's
"""
import argparse
import collections
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import intrinsic_self_improvement as isi  # noqa: E402
import support.tasks  # noqa: E402
from support.cpu_products import cpu_identity  # noqa: E402
from support.team import Team  # noqa: E402


def counted(lm):
    """Count the decoder's one-token calls and their rows by the stage label decode was given;
    returns the counts and a function that stops counting."""
    steps, rows, label = collections.Counter(), collections.Counter(), ["?"]
    real_decode = isi.decode

    def labelled(*args, desc, **kwargs):
        label[0] = desc
        return real_decode(*args, desc=desc, **kwargs)

    def pre_hook(_, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] == 1:
            steps[label[0]] += 1
            rows[label[0]] += ids.shape[0]
    isi.decode = labelled
    handle = lm.model.get_base_model().get_decoder().register_forward_pre_hook(pre_hook, with_kwargs=True)

    def stop():
        isi.decode = real_decode
        handle.remove()
    return steps, rows, stop


def one_cycle(lm, embedder, sandbox, cfg, domain, probe_tasks, folded: bool):
    """The fresh batch and the probe of cycle 1, in one arrangement; their records and timing."""
    if folded:
        stage, judged = isi.fresh_batch(lm, embedder, sandbox, cfg, domain, 2, probe_tasks)
    else:  # the batch's tasks drawn as fresh_batch draws them; its execution left out (no decoding)
        tasks = isi.draw_tasks(domain, cfg.tasks, random.Random(isi.stage_seed(cfg.seed, "tasks", 2)),
                               exclude={t.text for t in probe_tasks})
        stage = isi.run_stage(lm, embedder, cfg, tasks, copies=cfg.candidates, greedy=False,
                              seed=isi.stage_seed(cfg.seed, "batch", 2), label="batch 2")
        judged = isi.run_stage(lm, embedder, cfg, probe_tasks, copies=1, greedy=True,
                               seed=isi.stage_seed(cfg.seed, "probe", 1), label="probe").records
    _, probe_records = isi.probe(lm, embedder, sandbox, cfg, judged, 1)
    return stage, probe_records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/decode_steps.json")
    parser.add_argument("--pairs", type=int, default=1, help="runs of each arrangement, alternating which goes first")
    parser.add_argument("flags", nargs="*", help="the main script's flags (after --)")
    args = parser.parse_args(argv)
    cfg = isi.parse_config(args.flags)
    domain = support.tasks.load_domain(cfg.tasks_file, cfg.domain)
    probe_tasks = isi.draw_tasks(domain, cfg.probe_tasks, random.Random(isi.stage_seed(cfg.seed, "probe")),
                                 distinct=True)
    team = Team()
    sandbox = isi.open_sandbox(cfg, domain, team)
    lm, embedder = isi.load_models(cfg, team)
    results = {"machine": {"cpu": cpu_identity(), "platform": platform.platform()} | isi.compute_record(lm),
               "flags": args.flags, "date": time.strftime("%Y-%m-%d"), "arrangements": {}}
    records, seconds = {}, {"folded": [], "separate": []}
    try:
        for pair in range(args.pairs):  # the pairs alternate which arrangement goes first
            for name in ("folded", "separate")[::1 if pair % 2 == 0 else -1]:
                steps, rows, stop = counted(lm)
                started = time.perf_counter()
                try:
                    stage, probe_records = one_cycle(lm, embedder, sandbox, cfg, domain, probe_tasks, name == "folded")
                finally:
                    stop()
                seconds[name].append(round(time.perf_counter() - started, 1))
                records[name] = (stage.records, probe_records)
                results["arrangements"][name] = {
                    "seconds": seconds[name], "decode_steps": sum(steps.values()),
                    "by_stage": {k: {"steps": steps[k], "mean_rows": round(rows[k] / steps[k], 1)} for k in steps}}
                print(f"{name}: {sum(steps.values())} decode steps (" + ", ".join(
                    f"{k} {v}" for k, v in steps.items()) + f") in {seconds[name][-1]} s", flush=True)
    finally:
        if sandbox is not None:
            sandbox.close()
    keys = ("task", "command", "reconstruction")
    for i, part in enumerate(("batch", "probe")):
        folded, separate = records["folded"][i], records["separate"][i]
        results[part] = {
            "same_texts": [{k: r[k] for k in keys} for r in folded] == [{k: r[k] for k in keys} for r in separate],
            "largest_score_difference": max(abs(a["score"] - b["score"]) for a, b in zip(folded, separate))}
        print(f"{part}: same texts {results[part]['same_texts']}, scores differ by at most "
              f"{results[part]['largest_score_difference']:.2g} (the embedder's batches differ)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
